// CUDA kernel of manidp::gpu_gate: the gate of docs/DESIGN.md 1.1 with on-device compaction
// (docs/DESIGN.md 7.5).
//
// One thread block (256 threads, 8 warps) per instance:
//   1. s[c]  = sum_t part[n, t, c] / hw                      (threads over c)
//   2. h[k]  = relu(sum_c fc1[k, c] s[c])                    (a warp per row k, lanes over c)
//   3. g[c]  = min(relu(sum_k fc2[c, k] h[k] + b[c]), clamp) (a warp per row c)
//   4. active = g >= threshold && g > 0; g[n, c] is written for active channels, zero for the others
//      (conv2 reads its active channels from g > 0); compaction by warp ballots: active channels go
//      to idx[n, 0..cnt) ascending, inactive ones fill idx[n] from the end (descending).
// All in fp32 (the threshold compares as in training).  The threshold is read on the
// device: no host synchronisation.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "manidp_cuda.cuh"

namespace manidp {
namespace cuda {
namespace {

constexpr int kGateThreads = 256;
constexpr int kWarps = kGateThreads / 32;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__global__ void __launch_bounds__(kGateThreads) gate_kernel(
    const float* __restrict__ part, const float* __restrict__ fc1, const float* __restrict__ fc2,
    const float* __restrict__ bias, const float* __restrict__ thr_ptr, float* __restrict__ g_out,
    int* __restrict__ idx_out, int* __restrict__ cnt_out, int T, int CIN, int HID, int C, float hw,
    float clamp_max) {
  extern __shared__ float smem[];
  float* s = smem;          // CIN
  float* h = s + CIN;       // HID
  float* g = h + HID;       // C
  __shared__ int warp_a[kWarps], warp_i[kWarps];

  const int n = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* pn = part + static_cast<int64_t>(n) * T * CIN;

  for (int c = tid; c < CIN; c += kGateThreads) {
    float acc = 0.f;
    for (int t = 0; t < T; ++t) acc += pn[static_cast<int64_t>(t) * CIN + c];
    // __fdiv_rn: exact fp32 division although the sources build with --use_fast_math (docs/DESIGN.md 7.5).
    s[c] = __fdiv_rn(acc, hw);
  }
  __syncthreads();
  for (int k = warp; k < HID; k += kWarps) {
    const float* row = fc1 + static_cast<int64_t>(k) * CIN;
    float acc = 0.f;
    for (int c = lane; c < CIN; c += 32) acc = fmaf(row[c], s[c], acc);
    acc = warp_sum(acc);
    if (lane == 0) h[k] = fmaxf(acc, 0.f);
  }
  __syncthreads();
  for (int c = warp; c < C; c += kWarps) {
    const float* row = fc2 + static_cast<int64_t>(c) * HID;
    float acc = 0.f;
    for (int k = lane; k < HID; k += 32) acc = fmaf(row[k], h[k], acc);
    acc = warp_sum(acc);
    if (lane == 0) g[c] = fminf(fmaxf(acc + bias[c], 0.f), clamp_max);
  }
  __syncthreads();

  const float thr = *thr_ptr;
  int* idx_n = idx_out + static_cast<int64_t>(n) * C;
  int run_a = 0, run_i = 0;
  const unsigned lt_mask = (1u << lane) - 1u;
  for (int base = 0; base < C; base += kGateThreads) {
    const int c = base + tid;
    const bool valid = c < C;
    const float v = valid ? g[c] : 0.f;
    const bool act = valid && v >= thr && v > 0.f;
    const bool inact = valid && !act;
    if (valid) g_out[static_cast<int64_t>(n) * C + c] = act ? v : 0.f;
    const unsigned ba = __ballot_sync(0xffffffffu, act);
    const unsigned bi = __ballot_sync(0xffffffffu, inact);
    if (lane == 0) {
      warp_a[warp] = __popc(ba);
      warp_i[warp] = __popc(bi);
    }
    __syncthreads();
    int off_a = 0, off_i = 0, tot_a = 0, tot_i = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) {
        off_a += warp_a[w];
        off_i += warp_i[w];
      }
      tot_a += warp_a[w];
      tot_i += warp_i[w];
    }
    if (act) idx_n[run_a + off_a + __popc(ba & lt_mask)] = c;
    if (inact) idx_n[C - 1 - (run_i + off_i + __popc(bi & lt_mask))] = c;
    run_a += tot_a;
    run_i += tot_i;
    __syncthreads();  // warp_a/warp_i are rewritten by the next chunk
  }
  if (tid == 0) cnt_out[n] = run_a;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate(const at::Tensor& part, int64_t hw, const at::Tensor& fc1,
                                                    const at::Tensor& fc2, const at::Tensor& fc2_bias,
                                                    const at::Tensor& threshold, double clamp_max) {
  TORCH_CHECK(part.is_cuda(), "manidp::gpu_gate: part must be a CUDA tensor");
  TORCH_CHECK(part.dim() == 3 && part.scalar_type() == at::kFloat,
              "manidp::gpu_gate: part must be (N, T, Cin) float32");
  TORCH_CHECK(fc2.dim() == 2 && fc1.dim() == 2, "manidp::gpu_gate: fc1/fc2 must be matrices");
  const int64_t n = part.size(0), T = part.size(1), cin = part.size(2);
  const int64_t c = fc2.size(0), hid = fc2.size(1);
  TORCH_CHECK(fc1.size(0) == hid && fc1.size(1) == cin, "manidp::gpu_gate: fc1 must be (", hid, ", ", cin, "), got ",
              fc1.sizes());
  TORCH_CHECK(fc2_bias.numel() == c && threshold.numel() == 1,
              "manidp::gpu_gate: fc2_bias (C,) and threshold () expected");
  for (const at::Tensor* t : {&fc1, &fc2, &fc2_bias, &threshold}) {
    TORCH_CHECK(t->is_cuda() && t->device() == part.device() && t->scalar_type() == at::kFloat,
                "manidp::gpu_gate: gate tensors must be float32 on ", part.device());
  }
  TORCH_CHECK(hw > 0, "manidp::gpu_gate: hw must be positive");
  c10::cuda::CUDAGuard guard(part.device());
  auto part_c = part.contiguous();
  auto fc1_c = fc1.contiguous(), fc2_c = fc2.contiguous(), b_c = fc2_bias.contiguous();
  auto thr_c = threshold.contiguous();
  auto g = at::empty({n, c}, part.options());
  auto idx = at::empty({n, c}, part.options().dtype(at::kInt));
  auto cnt = at::empty({n}, part.options().dtype(at::kInt));
  if (n == 0 || c == 0) return {g, idx, cnt};
  const size_t smem = static_cast<size_t>(cin + hid + c) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, "manidp::gpu_gate: too many channels for one block (", cin, ", ", hid, ", ", c, ")");
  auto stream = c10::cuda::getCurrentCUDAStream();
  gate_kernel<<<static_cast<unsigned>(n), kGateThreads, smem, stream>>>(
      part_c.data_ptr<float>(), fc1_c.data_ptr<float>(), fc2_c.data_ptr<float>(), b_c.data_ptr<float>(),
      thr_c.data_ptr<float>(), g.data_ptr<float>(), idx.data_ptr<int>(), cnt.data_ptr<int>(), static_cast<int>(T),
      static_cast<int>(cin), static_cast<int>(hid), static_cast<int>(c), static_cast<float>(hw),
      static_cast<float>(clamp_max));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {g, idx, cnt};
}

}  // namespace cuda
}  // namespace manidp
