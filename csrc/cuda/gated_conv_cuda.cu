// CUDA kernels of manidp::gated_conv: gathered implicit-GEMM convolution with the fused epilogues
// of docs/DESIGN.md 3.2 (docs/DESIGN.md 7.5).
//
// GEMM per instance n: M = output pixels, N = entries j of the output-channel list
// (row oc = out_idx[n, j]), K = taps x input channels (column k reads x[..., k] and weight
// column in_idx[n, k]).  Layouts: x (N, H, W, CIN_BUF) channels-last, w (COUT, KS*KS, CIN),
// out (N, HO, WO, COUT).  A thread block computes a BM x BN tile; blockIdx = (pixel tile,
// channel tile, instance).  Blocks whose channel tile starts past the instance's count run
// no reduction step (mode 1 only writes zero channel sums and leaves).
//
// Two main loops share one prologue and one epilogue:
//   * SIMT: 256 threads, fp32 FMA on BM x 64 tiles (BK = 16), any dtype;
//   * WMMA: fp16/bf16 tensor cores (16x16x16, fp32 accumulate), a warp per 32x32 sub-tile,
//     BM x 64 tiles, BK = 32.
// The accumulator tile is staged in shared memory and the epilogue (bias, gate scale,
// ReLU / residual, store, per-tile channel sums) runs from there: coalesced channel-wise
// stores and a deterministic column reduction for the channel sums.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include "manidp_cuda.cuh"

namespace manidp {
namespace cuda {
namespace {

constexpr int BN = 64;   // output channels per tile (both kernels)
constexpr int CPAD = 4;  // padding of the staged accumulator rows (floats)

template <typename T>
struct ConvParams {
  const T* x;
  const T* w;
  const float* bias;
  const int* in_idx;
  const int* in_cnt;
  const int* out_idx;
  const int* out_cnt;
  const float* gate;
  const T* res;
  T* out;
  float* part;
  int H, W, HO, WO, CIN_BUF, CIN, COUT, T_tiles;
  int stride, ks, pad, mode;
  bool has_in_idx, has_out_idx, write_part;
};

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

// Per-block facts every thread needs, in shared memory: the instance's counts and number of
// reduction steps, and for each entry jj of the channel tile its output channel, whether it is
// active, its bias and its gate value.
struct TileShared {
  int cnt_out, cnt_in, steps, nkb;
  bool live;
  int oc[BN];
  bool jact[BN];
  float bias[BN], gate[BN];
};

template <typename T>
__device__ void tile_prologue(const ConvParams<T>& p, int n, int j0, int BK, TileShared& tile) {
  const int tid = threadIdx.x;
  if (tid == 0) {
    const int cnt_out = p.has_out_idx ? p.out_cnt[n] : p.COUT;
    const int cnt_in = p.has_in_idx ? p.in_cnt[n] : p.CIN;
    const int nkb = (cnt_in + BK - 1) / BK;
    tile.cnt_out = cnt_out;
    tile.cnt_in = cnt_in;
    tile.nkb = nkb;
    tile.live = j0 < cnt_out;
    tile.steps = tile.live ? nkb * p.ks * p.ks : 0;
  }
  __syncthreads();
  for (int jj = tid; jj < BN; jj += blockDim.x) {
    const int j = j0 + jj;
    const bool ok = j < p.COUT;
    const int oc = ok ? (p.has_out_idx ? p.out_idx[static_cast<int64_t>(n) * p.COUT + j] : j) : 0;
    tile.oc[jj] = oc;
    tile.jact[jj] = ok && j < tile.cnt_out;
    tile.bias[jj] = ok ? p.bias[oc] : 0.f;
    const bool gated = ok && p.mode != kModePlain && j < tile.cnt_out;
    tile.gate[jj] = gated ? p.gate[static_cast<int64_t>(n) * p.COUT + oc] : 0.f;
  }
  __syncthreads();
}

// Input element (pixel gm of the tile, GEMM column kk) for tap `tap`; zero outside the image.
template <typename T>
__device__ __forceinline__ T load_a(const ConvParams<T>& p, const T* xn, int gm, int kk, int kh, int kw, int cnt_in) {
  const int HWO = p.HO * p.WO;
  if (gm >= HWO || kk >= cnt_in) return T(0.f);
  const int oh = gm / p.WO, ow = gm - (gm / p.WO) * p.WO;
  const int ih = oh * p.stride - p.pad + kh, iw = ow * p.stride - p.pad + kw;
  if (ih < 0 || ih >= p.H || iw < 0 || iw >= p.W) return T(0.f);
  return xn[(static_cast<int64_t>(ih) * p.W + iw) * p.CIN_BUF + kk];
}

// Weight element (GEMM column kk, tile column jj) for tap `tap`; zero for inactive entries.
template <typename T>
__device__ __forceinline__ T load_b(const ConvParams<T>& p, int n, int kk, int tap, int oc, bool jact, int cnt_in) {
  if (!jact || kk >= cnt_in) return T(0.f);
  const int ic = p.has_in_idx ? p.in_idx[static_cast<int64_t>(n) * p.CIN + kk] : kk;
  return p.w[(static_cast<int64_t>(oc) * p.ks * p.ks + tap) * p.CIN + ic];
}

// Stages reduction step `step` (a tap and a chunk of BK input columns) in shared memory, as S:
// A, BM pixels x BK columns, stored k-major (As[k * lda + m], A_KMAJOR) or m-major
// (As[m * lda + k]); B, BK columns x BN entries (Bs[k * ldb + jj]).  All THREADS threads of the block.
template <typename T, typename S, int BM, int BK, int THREADS, bool A_KMAJOR>
__device__ __forceinline__ void stage_step(const ConvParams<T>& p, const TileShared& tile, const T* xn, int n, int m0,
                                           int step, S* As, int lda, S* Bs, int ldb) {
  const int tap = step / tile.nkb, kb = step - tap * tile.nkb;
  const int kh = tap / p.ks, kw = tap - kh * p.ks;
  const int k0 = kb * BK, cnt_in = tile.cnt_in;
  for (int e = threadIdx.x; e < BM * BK; e += THREADS) {
    const int m = e / BK, k = e % BK;
    As[A_KMAJOR ? k * lda + m : m * lda + k] = static_cast<S>(load_a(p, xn, m0 + m, k0 + k, kh, kw, cnt_in));
  }
  for (int e = threadIdx.x; e < BN * BK; e += THREADS) {
    const int jj = e / BK, k = e % BK;
    Bs[k * ldb + jj] = static_cast<S>(load_b(p, n, k0 + k, tap, tile.oc[jj], tile.jact[jj], cnt_in));
  }
}

// Epilogue from the staged accumulators Cs[BM][BN + CPAD] (all threads of the block).
template <typename T, int BM>
__device__ void tile_epilogue(const ConvParams<T>& p, int n, int m_tile, int j0, float* Cs, const TileShared& tile) {
  constexpr int LDC = BN + CPAD;
  const int HWO = p.HO * p.WO;
  const int m0 = m_tile * BM;
  const int64_t obase = static_cast<int64_t>(n) * HWO * p.COUT;
  for (int e = threadIdx.x; e < BM * BN; e += blockDim.x) {
    const int m = e / BN, jj = e - (e / BN) * BN;
    const int gm = m0 + m, j = j0 + jj;
    const bool m_ok = gm < HWO, j_ok = j < p.COUT, jact = tile.jact[jj];
    const int oc = tile.oc[jj];
    float v = Cs[m * LDC + jj] + tile.bias[jj];
    float keep = 0.f;
    if (p.mode == kModePlain) {
      if (m_ok && j_ok) p.out[obase + static_cast<int64_t>(gm) * p.COUT + oc] = T(v);
    } else if (p.mode == kModeConv1) {
      v = fmaxf(v * tile.gate[jj], 0.f);
      const T q = T(v);
      if (m_ok && jact) {
        p.out[obase + static_cast<int64_t>(gm) * p.COUT + j] = q;
        keep = to_f(q);
      }
    } else {
      if (m_ok && j_ok) {
        const int64_t o = obase + static_cast<int64_t>(gm) * p.COUT + oc;
        const float r = to_f(p.res[o]);
        v = jact ? fmaxf(fmaf(v, tile.gate[jj], r), 0.f) : fmaxf(r, 0.f);
        const T q = T(v);
        p.out[o] = q;
        keep = to_f(q);
      }
    }
    Cs[m * LDC + jj] = keep;
  }
  if (!p.write_part || p.mode == kModePlain) return;
  __syncthreads();
  for (int jj = threadIdx.x; jj < BN; jj += blockDim.x) {
    const int j = j0 + jj;
    if (j >= p.COUT) continue;
    float s = 0.f;
    for (int m = 0; m < BM; ++m) s += Cs[m * LDC + jj];
    p.part[(static_cast<int64_t>(n) * p.T_tiles + m_tile) * p.COUT + tile.oc[jj]] = s;
  }
}

// Mode 1 block with no active channel: zero channel sums, nothing else.
template <typename T>
__device__ void write_zero_parts(const ConvParams<T>& p, int n, int m_tile, int j0, const int* s_oc) {
  if (!p.write_part) return;
  for (int jj = threadIdx.x; jj < BN; jj += blockDim.x) {
    if (j0 + jj < p.COUT) p.part[(static_cast<int64_t>(n) * p.T_tiles + m_tile) * p.COUT + s_oc[jj]] = 0.f;
  }
}

// Fills `tile` for this block's tile (blockIdx = pixel tile, channel tile, instance).  False when the
// block is done: a conv1 tile with no active channel only writes zero channel sums.
template <typename T>
__device__ bool begin_tile(const ConvParams<T>& p, int BK, TileShared& tile) {
  const int m_tile = blockIdx.x, j0 = blockIdx.y * BN, n = blockIdx.z;
  tile_prologue(p, n, j0, BK, tile);
  if (p.mode == kModeConv1 && !tile.live) {
    write_zero_parts(p, n, m_tile, j0, tile.oc);
    return false;
  }
  return true;
}

// ------------------------------------------------------------------------------ SIMT kernel
template <typename T, int BM>
struct SimtCfg {
  static constexpr int BK = 16, THREADS = 256, TN = BN / 16, TM = BM / 16;
  static constexpr int LDA = BM + 4, LDB = BN + 4;
  static constexpr int LOOP_BYTES = (BK * LDA + BK * LDB) * 4;
  static constexpr int EPI_BYTES = BM * (BN + CPAD) * 4;
  static constexpr int SMEM = LOOP_BYTES > EPI_BYTES ? LOOP_BYTES : EPI_BYTES;
};

template <typename T, int BM>
__global__ void __launch_bounds__(256) conv_simt_kernel(const ConvParams<T> p) {
  using Cfg = SimtCfg<T, BM>;
  constexpr int BK = Cfg::BK, TM = Cfg::TM, TN = Cfg::TN;
  __shared__ __align__(16) unsigned char smem_raw[Cfg::SMEM];
  __shared__ TileShared tile;
  float* As = reinterpret_cast<float*>(smem_raw);  // [BK][LDA]: As[k][m]
  float* Bs = As + BK * Cfg::LDA;                  // [BK][LDB]: Bs[k][j]
  float* Cs = reinterpret_cast<float*>(smem_raw);  // [BM][BN + CPAD], after the main loop

  if (!begin_tile(p, BK, tile)) return;
  const int m_tile = blockIdx.x, j0 = blockIdx.y * BN, n = blockIdx.z;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int m0 = m_tile * BM;
  const T* xn = p.x + static_cast<int64_t>(n) * p.H * p.W * p.CIN_BUF;
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  for (int step = 0; step < tile.steps; ++step) {
    stage_step<T, float, BM, BK, Cfg::THREADS, true>(p, tile, xn, n, m0, step, As, Cfg::LDA, Bs, Cfg::LDB);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[k * Cfg::LDA + ty * TM + i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Bs[k * Cfg::LDB + tx * TN + j];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) Cs[(ty * TM + i) * (BN + CPAD) + tx * TN + j] = acc[i][j];
  __syncthreads();
  tile_epilogue<T, BM>(p, n, m_tile, j0, Cs, tile);
}

// ------------------------------------------------------------------------------ WMMA kernel
template <typename T>
struct WmmaType;
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename T, int BM>
struct WmmaCfg {
  static constexpr int BK = 32, WARPS_M = BM / 32, WARPS_N = BN / 32, THREADS = WARPS_M * WARPS_N * 32;
  static constexpr int LDA = BK + 8, LDB = BN + 8;  // 16-bit elements; multiples of 8 as WMMA requires
  static constexpr int LOOP_BYTES = (BM * LDA + BK * LDB) * 2;
  static constexpr int EPI_BYTES = BM * (BN + CPAD) * 4;
  static constexpr int SMEM = LOOP_BYTES > EPI_BYTES ? LOOP_BYTES : EPI_BYTES;
};

template <typename T, int BM>
__global__ void __launch_bounds__(WmmaCfg<T, BM>::THREADS) conv_wmma_kernel(const ConvParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80+; the host side only picks this kernel on such devices
#else
  using namespace nvcuda;
  using Cfg = WmmaCfg<T, BM>;
  using WT = typename WmmaType<T>::type;
  constexpr int BK = Cfg::BK;
  __shared__ __align__(128) unsigned char smem_raw[Cfg::SMEM];
  __shared__ TileShared tile;
  T* As = reinterpret_cast<T*>(smem_raw);             // [BM][LDA]: As[m][k]
  T* Bs = As + BM * Cfg::LDA;                         // [BK][LDB]: Bs[k][j]
  float* Cs = reinterpret_cast<float*>(smem_raw);     // [BM][BN + CPAD], after the main loop

  if (!begin_tile(p, BK, tile)) return;
  const int m_tile = blockIdx.x, j0 = blockIdx.y * BN, n = blockIdx.z;
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int m0 = m_tile * BM;
  const T* xn = p.x + static_cast<int64_t>(n) * p.H * p.W * p.CIN_BUF;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int step = 0; step < tile.steps; ++step) {
    stage_step<T, T, BM, BK, Cfg::THREADS, false>(p, tile, xn, n, m0, step, As, Cfg::LDA, Bs, Cfg::LDB);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const WT*>(As + (wm * 32 + i * 16) * Cfg::LDA + kk), Cfg::LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], reinterpret_cast<const WT*>(Bs + kk * Cfg::LDB + wn * 32 + j * 16), Cfg::LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * (BN + CPAD) + wn * 32 + j * 16, acc[i][j], BN + CPAD,
                              wmma::mem_row_major);
  __syncthreads();
  tile_epilogue<T, BM>(p, n, m_tile, j0, Cs, tile);
#endif
}

// ------------------------------------------------------------------------------ launch
template <typename T, int BM>
void launch(const ConvParams<T>& p, int n, bool wmma, cudaStream_t stream) {
  const dim3 grid((p.HO * p.WO + BM - 1) / BM, (p.COUT + BN - 1) / BN, n);
  if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>) {
    if (wmma) {
      conv_wmma_kernel<T, BM><<<grid, WmmaCfg<T, BM>::THREADS, 0, stream>>>(p);
      return;
    }
  }
  conv_simt_kernel<T, BM><<<grid, SimtCfg<T, BM>::THREADS, 0, stream>>>(p);
}

const int* opt_int_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<int>() : nullptr;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_conv(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& bias_in,
                                              const c10::optional<at::Tensor>& in_idx_in,
                                              const c10::optional<at::Tensor>& in_cnt_in,
                                              const c10::optional<at::Tensor>& out_idx_in,
                                              const c10::optional<at::Tensor>& out_cnt_in,
                                              const c10::optional<at::Tensor>& gate_in,
                                              const c10::optional<at::Tensor>& res_in, int64_t stride, int64_t ksize,
                                              int64_t mode, int64_t block_m, bool write_part, bool /*tf32*/,
                                              int64_t impl) {
  TORCH_CHECK(x_in.is_cuda() && x_in.dim() == 4, "manidp::gated_conv: x must be a CUDA tensor (N, H, W, C)");
  TORCH_CHECK(w_in.dim() == 3 && w_in.size(1) == ksize * ksize, "manidp::gated_conv: w must be (Cout, k*k, Cin)");
  TORCH_CHECK(w_in.scalar_type() == x_in.scalar_type(), "manidp::gated_conv: x and w dtypes differ");
  TORCH_CHECK(bias_in.scalar_type() == at::kFloat && bias_in.numel() == w_in.size(0),
              "manidp::gated_conv: bias must be (Cout,) float32");
  TORCH_CHECK(mode == kModePlain || mode == kModeConv1 || mode == kModeConv2, "manidp::gated_conv: mode must be ",
              static_cast<int64_t>(kModePlain), ", ", static_cast<int64_t>(kModeConv1), " or ",
              static_cast<int64_t>(kModeConv2), "; got ", mode);
  TORCH_CHECK(block_m == 32 || block_m == 64 || block_m == 128, "manidp::gated_conv: block_m must be 32, 64 or 128");
  TORCH_CHECK(stride >= 1 && (ksize == 1 || ksize == 3), "manidp::gated_conv: ksize 1 or 3, stride >= 1");
  TORCH_CHECK(in_idx_in.has_value() == in_cnt_in.has_value(), "manidp::gated_conv: in_idx and in_cnt go together");
  TORCH_CHECK(out_idx_in.has_value() == out_cnt_in.has_value(), "manidp::gated_conv: out_idx and out_cnt go together");
  TORCH_CHECK(mode == kModePlain || (out_idx_in.has_value() && gate_in.has_value()),
              "manidp::gated_conv: the conv1 and conv2 modes need out_idx/out_cnt and gate");
  TORCH_CHECK(mode != kModeConv2 || res_in.has_value(), "manidp::gated_conv: the conv2 mode needs res");
  c10::cuda::CUDAGuard guard(x_in.device());

  auto x = x_in.contiguous(), w = w_in.contiguous(), bias = bias_in.contiguous();
  const int64_t n = x.size(0), H = x.size(1), W = x.size(2), cbuf = x.size(3);
  const int64_t cout = w.size(0), cin = w.size(2), pad = ksize / 2;
  const int64_t HO = conv_out_size(H, ksize, stride, pad), WO = conv_out_size(W, ksize, stride, pad);
  TORCH_CHECK(HO > 0 && WO > 0, "manidp::gated_conv: empty output");
  TORCH_CHECK(n <= 65535, "manidp::gated_conv: at most 65535 instances per call (grid z)");
  TORCH_CHECK(in_idx_in.has_value() || cbuf >= cin, "manidp::gated_conv: x has ", cbuf, " channels, w wants ", cin);
  TORCH_CHECK(static_cast<int64_t>(H) * W * cbuf < (int64_t(1) << 31) && HO * WO * cout < (int64_t(1) << 31),
              "manidp::gated_conv: one instance's tensors must have < 2^31 elements");
  const bool parts = write_part && mode != kModePlain;
  const int64_t T = parts ? (HO * WO + block_m - 1) / block_m : 0;
  auto out = at::empty({n, HO, WO, cout}, x.options());
  auto part = at::empty({n, T, cout}, x.options().dtype(at::kFloat));
  if (n == 0) return {out, part};

  auto check_idx = [&](const c10::optional<at::Tensor>& t, int64_t cols, const char* name) -> c10::optional<at::Tensor> {
    if (!t.has_value()) return c10::nullopt;
    TORCH_CHECK(t->is_cuda() && t->device() == x.device() && t->scalar_type() == at::kInt,
                "manidp::gated_conv: ", name, " must be int32 on ", x.device());
    TORCH_CHECK(cols < 0 ? t->numel() == n : (t->dim() == 2 && t->size(0) == n && t->size(1) == cols),
                "manidp::gated_conv: ", name, " has shape ", t->sizes());
    return t->contiguous();
  };
  auto in_idx = check_idx(in_idx_in, cin, "in_idx"), in_cnt = check_idx(in_cnt_in, -1, "in_cnt");
  auto out_idx = check_idx(out_idx_in, cout, "out_idx"), out_cnt = check_idx(out_cnt_in, -1, "out_cnt");
  c10::optional<at::Tensor> gate, res;
  if (gate_in.has_value()) {
    TORCH_CHECK(gate_in->scalar_type() == at::kFloat && gate_in->dim() == 2 && gate_in->size(0) == n &&
                    gate_in->size(1) == cout && gate_in->device() == x.device(),
                "manidp::gated_conv: gate must be (N, Cout) float32");
    gate = gate_in->contiguous();
  }
  if (res_in.has_value()) {
    TORCH_CHECK(res_in->sizes() == out.sizes() && res_in->scalar_type() == x.scalar_type() &&
                    res_in->device() == x.device(),
                "manidp::gated_conv: res must match the output (", out.sizes(), ")");
    res = res_in->contiguous();
  }
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(impl != kImplWmma || half, "manidp::gated_conv: the WMMA kernel needs fp16 or bf16");
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  const bool use_wmma = half && impl != kImplSimt && major >= 8;
  TORCH_CHECK(impl != kImplWmma || use_wmma, "manidp::gated_conv: the WMMA kernel needs compute capability 8.0+");
  auto stream = c10::cuda::getCurrentCUDAStream();

  TORCH_CHECK(x.scalar_type() != at::kDouble, "manidp::gated_conv: float64 is not supported");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gated_conv", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      ConvParams<scalar_t> p;
      p.x = x.data_ptr<scalar_t>();
      p.w = w.data_ptr<scalar_t>();
      p.bias = bias.data_ptr<float>();
      p.in_idx = opt_int_ptr(in_idx);
      p.in_cnt = opt_int_ptr(in_cnt);
      p.out_idx = opt_int_ptr(out_idx);
      p.out_cnt = opt_int_ptr(out_cnt);
      p.gate = gate.has_value() ? gate->data_ptr<float>() : nullptr;
      p.res = res.has_value() ? res->data_ptr<scalar_t>() : nullptr;
      p.out = out.data_ptr<scalar_t>();
      p.part = parts ? part.data_ptr<float>() : nullptr;
      p.H = H, p.W = W, p.HO = HO, p.WO = WO, p.CIN_BUF = cbuf, p.CIN = cin, p.COUT = cout;
      p.T_tiles = static_cast<int>(T);
      p.stride = stride, p.ks = ksize, p.pad = pad, p.mode = mode;
      p.has_in_idx = in_idx.has_value();
      p.has_out_idx = out_idx.has_value();
      p.write_part = parts;
      switch (block_m) {
        case 32: launch<scalar_t, 32>(p, n, use_wmma, stream); break;
        case 64: launch<scalar_t, 64>(p, n, use_wmma, stream); break;
        default: launch<scalar_t, 128>(p, n, use_wmma, stream); break;
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {out, part};
}

}  // namespace cuda
}  // namespace manidp
