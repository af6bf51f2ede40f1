// CUDA kernels of manidp::gated_conv: gathered implicit-GEMM convolution with the fused epilogues
// of docs/DESIGN.md 3.2 (docs/DESIGN.md 7.5).
//
// GEMM per instance n: M = output pixels, N = output columns j, K = taps x input channels
// (column k reads x[..., k] and weight input channel in_idx[n, k]).  Column j is channel
// out_idx[n, j] in mode 1 (conv1, compact output) and channel j otherwise; in mode 2 (conv2)
// channel j is active when gate[n, j] > 0 (the gate writes zero for inactive channels).
// Layouts: x (N, H, W, CIN_BUF) channels-last; w (COUT, KS*KS, CIN) in modes 0 and 1,
// (KS*KS, CIN, COUT) in mode 2 (docs/DESIGN.md 7.4); out (N, HO, WO, COUT).  A thread block
// computes a BM x BN tile; blockIdx = (pixel tile, channel tile, instance).  Blocks whose
// channel tile holds no active channel run no reduction step (mode 1 only writes zero channel
// sums and leaves).  Mode 1 writes zeros after the active channels up to the next multiple of
// kChannelPad (16): conv2 kernels may read them.
//
// Two main loops share one prologue and one epilogue:
//   * SIMT: 256 threads, fp32 FMA on BM x 64 tiles (BK = 16), any dtype;
//   * WMMA: fp16/bf16 tensor cores (16x16x16, fp32 accumulate), a warp per 32x32 sub-tile,
//     BM x 64 tiles, BK = 32, operands staged by 16-byte cp.async copies into two stages.
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

#include <cstdint>
#include <type_traits>

#include "manidp_cuda.cuh"

namespace manidp {
namespace cuda {
namespace {

#ifndef MANIDP_CHANNEL_PAD
#error "MANIDP_CHANNEL_PAD must be defined (kernels/build_config.py passes it with the mode numbers)"
#endif

constexpr int BN = 64;                           // output channels per tile (both kernels)
constexpr int CPAD = 4;                          // padding of the staged accumulator rows (floats)
constexpr int kChannelPad = MANIDP_CHANNEL_PAD;  // mode 1 zero-pads its compact output to a multiple of this

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
  bool vec;  // operands may be staged by 16-byte copies (WMMA kernel; shapes and alignment checked on the host)
};

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

// Per-block facts every thread needs, in shared memory: the instance's counts and number of
// reduction steps, and for each column jj of the channel tile its output channel, whether it is
// active, its bias and its gate value.
struct TileShared {
  int cnt_out, cnt_in, k_lim, steps, nkb;
  bool live;
  int oc[BN];
  bool jact[BN];
  float bias[BN], gate[BN];
};

template <typename T>
__device__ void tile_prologue(const ConvParams<T>& p, int n, int j0, int BK, TileShared& tile) {
  const int tid = threadIdx.x;
  if (tid == 0) {
    tile.cnt_out = p.has_out_idx ? p.out_cnt[n] : p.COUT;
    tile.cnt_in = p.has_in_idx ? p.in_cnt[n] : p.CIN;
    // Input columns that may be read: a compact input up to its zero padding.
    tile.k_lim = p.has_in_idx ? min((tile.cnt_in + kChannelPad - 1) / kChannelPad * kChannelPad, p.CIN_BUF) : p.CIN;
    tile.nkb = (tile.cnt_in + BK - 1) / BK;
  }
  __syncthreads();
  const int64_t row = static_cast<int64_t>(n) * p.COUT;
  bool any_active = false;
  for (int jj = tid; jj < BN; jj += blockDim.x) {
    const int j = j0 + jj;
    const bool ok = j < p.COUT;
    int oc = ok ? j : 0;
    bool act = ok;
    float gate = 0.f;
    if (p.mode == kModeConv1) {
      oc = ok ? p.out_idx[row + j] : 0;
      act = ok && j < tile.cnt_out;
      gate = act ? p.gate[row + oc] : 0.f;
    } else if (p.mode == kModeConv2) {
      gate = ok ? p.gate[row + j] : 0.f;
      act = gate > 0.f;
    }
    tile.oc[jj] = oc;
    tile.jact[jj] = act;
    tile.bias[jj] = ok ? p.bias[oc] : 0.f;
    tile.gate[jj] = gate;
    any_active = any_active || act;
  }
  const bool live = __syncthreads_or(any_active);
  if (tid == 0) {
    tile.live = live;
    tile.steps = live ? tile.nkb * p.ks * p.ks : 0;
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
  if (p.mode == kModeConv2) return p.w[(static_cast<int64_t>(tap) * p.CIN + ic) * p.COUT + oc];
  return p.w[(static_cast<int64_t>(oc) * p.ks * p.ks + tap) * p.CIN + ic];
}

// The tap and first input column of reduction step `step`.
struct StepCoords {
  int tap, kh, kw, k0;
};

__device__ __forceinline__ StepCoords step_coords(int step, int nkb, int ks, int BK) {
  const int tap = step / nkb, kb = step - tap * nkb;
  const int kh = tap / ks;
  return {tap, kh, tap - kh * ks, kb * BK};
}

// Stages reduction step `step` (a tap and a chunk of BK input columns) in shared memory, as S, with
// scalar loads: A, BM pixels x BK columns, stored k-major (As[k * lda + m], A_KMAJOR) or m-major
// (As[m * lda + k]); B, BK columns x BN entries, stored j-major (Bs[jj * ldb + k], B_JMAJOR) or
// k-major (Bs[k * ldb + jj]).  All THREADS threads of the block.
template <typename T, typename S, int BM, int BK, int THREADS, bool A_KMAJOR, bool B_JMAJOR>
__device__ __forceinline__ void stage_step(const ConvParams<T>& p, const TileShared& tile, const T* xn, int n, int m0,
                                           int step, S* As, int lda, S* Bs, int ldb) {
  const StepCoords c = step_coords(step, tile.nkb, p.ks, BK);
  const int cnt_in = tile.cnt_in;
  for (int e = threadIdx.x; e < BM * BK; e += THREADS) {
    const int m = e / BK, k = e % BK;
    As[A_KMAJOR ? k * lda + m : m * lda + k] = static_cast<S>(load_a(p, xn, m0 + m, c.k0 + k, c.kh, c.kw, cnt_in));
  }
  // Consecutive threads read consecutive weights: along the output channels in mode 2, along K otherwise.
  if (p.mode == kModeConv2) {
    for (int e = threadIdx.x; e < BN * BK; e += THREADS) {
      const int k = e / BN, jj = e % BN;
      const S v = static_cast<S>(load_b(p, n, c.k0 + k, c.tap, tile.oc[jj], tile.jact[jj], cnt_in));
      Bs[B_JMAJOR ? jj * ldb + k : k * ldb + jj] = v;
    }
    return;
  }
  for (int e = threadIdx.x; e < BN * BK; e += THREADS) {
    const int jj = e / BK, k = e % BK;
    const S v = static_cast<S>(load_b(p, n, c.k0 + k, c.tap, tile.oc[jj], tile.jact[jj], cnt_in));
    Bs[B_JMAJOR ? jj * ldb + k : k * ldb + jj] = v;
  }
}

// ------------------------------------------------------------------------------ 16-byte async staging
constexpr int kVec = 8;  // 16-bit elements per 16-byte copy
static_assert(kChannelPad % kVec == 0, "a zero-padded compact input must end on a whole 16-byte copy");

// cp.async of 16 bytes from global to shared memory; zero-filled, reading nothing, when !valid.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `Pending` of this thread's committed copy groups are still in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
#endif
}

// A tile of step `c`, BM pixels x BK columns, m-major (As[m * lda + k]), 16 bytes per copy: columns
// come in groups of kVec that are all below the tile's k_lim or all above it (checked on the host).
template <typename T, int BM, int BK, int THREADS>
__device__ __forceinline__ void copy_a_async(const ConvParams<T>& p, const TileShared& tile, const T* xn, int m0,
                                             const StepCoords& c, T* As, int lda) {
  constexpr int kPerRow = BK / kVec;
  const int HWO = p.HO * p.WO;
  for (int e = threadIdx.x; e < BM * kPerRow; e += THREADS) {
    const int m = e / kPerRow, k = (e % kPerRow) * kVec;
    const int gm = m0 + m;
    const int oh = gm / p.WO, ow = gm - (gm / p.WO) * p.WO;
    const int ih = oh * p.stride - p.pad + c.kh, iw = ow * p.stride - p.pad + c.kw;
    const bool valid = gm < HWO && c.k0 + k < tile.k_lim && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
    const T* src = valid ? xn + (static_cast<int64_t>(ih) * p.W + iw) * p.CIN_BUF + c.k0 + k : xn;
    cp_async_16(As + m * lda + k, src, valid);
  }
}

// B tile of step `c` in mode 2: weights (KS*KS, CIN, COUT), rows gathered by in_idx, k-major
// (Bs[k * ldb + jj]), 16 bytes along the output channels per copy.
template <typename T, int BK, int THREADS>
__device__ __forceinline__ void copy_b_by_input_async(const ConvParams<T>& p, const TileShared& tile, int n, int j0,
                                                      const StepCoords& c, T* Bs, int ldb) {
  constexpr int kPerRow = BN / kVec;
  for (int e = threadIdx.x; e < BK * kPerRow; e += THREADS) {
    const int k = e / kPerRow, jj = (e % kPerRow) * kVec;
    const int kk = c.k0 + k;
    const bool valid = kk < tile.cnt_in && j0 + jj < p.COUT;
    const int ic = valid && p.has_in_idx ? p.in_idx[static_cast<int64_t>(n) * p.CIN + kk] : kk;
    const T* src = valid ? p.w + (static_cast<int64_t>(c.tap) * p.CIN + ic) * p.COUT + j0 + jj : p.w;
    cp_async_16(Bs + k * ldb + jj, src, valid);
  }
}

// B tile of step `c` in modes 0 and 1: weights (COUT, KS*KS, CIN), rows gathered by the tile's output
// channels, j-major (Bs[jj * ldb + k]), 16 bytes along the input channels per copy.
template <typename T, int BK, int THREADS>
__device__ __forceinline__ void copy_b_by_output_async(const ConvParams<T>& p, const TileShared& tile,
                                                       const StepCoords& c, T* Bs, int ldb) {
  constexpr int kPerRow = BK / kVec;
  for (int e = threadIdx.x; e < BN * kPerRow; e += THREADS) {
    const int jj = e / kPerRow, k = (e % kPerRow) * kVec;
    const bool valid = tile.jact[jj] && c.k0 + k < tile.cnt_in;
    const T* src = valid ? p.w + (static_cast<int64_t>(tile.oc[jj]) * p.ks * p.ks + c.tap) * p.CIN + c.k0 + k : p.w;
    cp_async_16(Bs + jj * ldb + k, src, valid);
  }
}

// Epilogue from the staged accumulators Cs[BM][BN + CPAD] (all threads of the block).
template <typename T, int BM>
__device__ void tile_epilogue(const ConvParams<T>& p, int n, int m_tile, int j0, float* Cs, const TileShared& tile) {
  constexpr int LDC = BN + CPAD;
  const int HWO = p.HO * p.WO;
  const int m0 = m_tile * BM;
  const int64_t obase = static_cast<int64_t>(n) * HWO * p.COUT;
  const int pad_end = min((tile.cnt_out + kChannelPad - 1) / kChannelPad * kChannelPad, p.COUT);
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
      } else if (m_ok && j < pad_end) {
        p.out[obase + static_cast<int64_t>(gm) * p.COUT + j] = T(0.f);
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
    stage_step<T, float, BM, BK, Cfg::THREADS, true, false>(p, tile, xn, n, m0, step, As, Cfg::LDA, Bs, Cfg::LDB);
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

// BY_INPUT: mode 2, whose weight rows are contiguous along the output channels (B staged k-major);
// otherwise along the input channels (B staged j-major).  Two stages of operands, so the copies of
// step s + 1 run while the tensor cores work on step s.
template <typename T, int BM, bool BY_INPUT>
struct WmmaCfg {
  static constexpr int BK = 32, WARPS_M = BM / 32, WARPS_N = BN / 32, THREADS = WARPS_M * WARPS_N * 32;
  // 16-bit elements; row lengths are multiples of 8 (WMMA) whose 16-row blocks start 32-byte aligned.
  static constexpr int LDA = BK + 8, LDB = BY_INPUT ? BN + 8 : BK + 8;
  static constexpr int A_ELEMS = BM * LDA, B_ELEMS = BY_INPUT ? BK * LDB : BN * LDB;
  static constexpr int STAGE_ELEMS = A_ELEMS + B_ELEMS;
  static constexpr int LOOP_BYTES = 2 * STAGE_ELEMS * 2;
  static constexpr int EPI_BYTES = BM * (BN + CPAD) * 4;
  static constexpr int SMEM = LOOP_BYTES > EPI_BYTES ? LOOP_BYTES : EPI_BYTES;
};

// Stages step `step` into stage buffers As, Bs: 16-byte async copies where the host allowed them
// (p.vec), scalar loads otherwise.
template <typename T, int BM, bool BY_INPUT>
__device__ __forceinline__ void wmma_stage(const ConvParams<T>& p, const TileShared& tile, const T* xn, int n, int m0,
                                           int j0, int step, T* As, T* Bs) {
  using Cfg = WmmaCfg<T, BM, BY_INPUT>;
  if (!p.vec) {
    stage_step<T, T, BM, Cfg::BK, Cfg::THREADS, false, !BY_INPUT>(p, tile, xn, n, m0, step, As, Cfg::LDA, Bs, Cfg::LDB);
    return;
  }
  const StepCoords c = step_coords(step, tile.nkb, p.ks, Cfg::BK);
  copy_a_async<T, BM, Cfg::BK, Cfg::THREADS>(p, tile, xn, m0, c, As, Cfg::LDA);
  if constexpr (BY_INPUT) {
    copy_b_by_input_async<T, Cfg::BK, Cfg::THREADS>(p, tile, n, j0, c, Bs, Cfg::LDB);
  } else {
    copy_b_by_output_async<T, Cfg::BK, Cfg::THREADS>(p, tile, c, Bs, Cfg::LDB);
  }
}

template <typename T, int BM, bool BY_INPUT>
__global__ void __launch_bounds__(WmmaCfg<T, BM, BY_INPUT>::THREADS) conv_wmma_kernel(const ConvParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA and cp.async need sm_80+; the host side only picks this kernel on such devices
#else
  using namespace nvcuda;
  using Cfg = WmmaCfg<T, BM, BY_INPUT>;
  using WT = typename WmmaType<T>::type;
  using BLayout = std::conditional_t<BY_INPUT, wmma::row_major, wmma::col_major>;
  constexpr int BK = Cfg::BK;
  __shared__ __align__(128) unsigned char smem_raw[Cfg::SMEM];
  __shared__ TileShared tile;
  T* stage_base = reinterpret_cast<T*>(smem_raw);  // stage s: A [BM][LDA], then B
  float* Cs = reinterpret_cast<float*>(smem_raw);  // [BM][BN + CPAD], after the main loop

  if (!begin_tile(p, BK, tile)) return;
  const int m_tile = blockIdx.x, j0 = blockIdx.y * BN, n = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int wm = warp / Cfg::WARPS_N, wn = warp % Cfg::WARPS_N;
  const int m0 = m_tile * BM;
  const T* xn = p.x + static_cast<int64_t>(n) * p.H * p.W * p.CIN_BUF;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const int steps = tile.steps;
  if (steps > 0) wmma_stage<T, BM, BY_INPUT>(p, tile, xn, n, m0, j0, 0, stage_base, stage_base + Cfg::A_ELEMS);
  cp_async_commit();
  for (int step = 0; step < steps; ++step) {
    // Issue step + 1 into the other stage (its last readers passed the barrier ending step - 1).
    if (step + 1 < steps) {
      T* next = stage_base + ((step + 1) & 1) * Cfg::STAGE_ELEMS;
      wmma_stage<T, BM, BY_INPUT>(p, tile, xn, n, m0, j0, step + 1, next, next + Cfg::A_ELEMS);
    }
    cp_async_commit();
    cp_async_wait<1>();  // this thread's copies of step `step` have landed
    __syncthreads();     // ... and every thread's
    const T* As = stage_base + (step & 1) * Cfg::STAGE_ELEMS;
    const T* Bs = As + Cfg::A_ELEMS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const WT*>(As + (wm * 32 + i * 16) * Cfg::LDA + kk), Cfg::LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = wn * 32 + j * 16;
        const T* b = BY_INPUT ? Bs + kk * Cfg::LDB + col : Bs + col * Cfg::LDB + kk;
        wmma::load_matrix_sync(fb[j], reinterpret_cast<const WT*>(b), Cfg::LDB);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();  // the next iteration refills the stage read here
  }
  cp_async_wait<0>();
  __syncthreads();  // the accumulators are staged over the operand buffers
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
    if (wmma && p.mode == kModeConv2) {
      conv_wmma_kernel<T, BM, true><<<grid, WmmaCfg<T, BM, true>::THREADS, 0, stream>>>(p);
      return;
    }
    if (wmma) {
      conv_wmma_kernel<T, BM, false><<<grid, WmmaCfg<T, BM, false>::THREADS, 0, stream>>>(p);
      return;
    }
  }
  conv_simt_kernel<T, BM><<<grid, SimtCfg<T, BM>::THREADS, 0, stream>>>(p);
}

// Whether the WMMA kernel may stage its operands by 16-byte copies: every copy is a whole group of
// kVec channels, inside the tensor or wholly outside it, at a 16-byte aligned address.
bool can_copy_16_bytes(const at::Tensor& x, const at::Tensor& w, int64_t cbuf, int64_t cin, int64_t cout,
                       bool has_in_idx, int64_t mode) {
  const auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  // With in_idx the input is read up to its zero padding, a multiple of kChannelPad or cbuf.
  const bool a_ok = cbuf % kVec == 0 && (has_in_idx || cin % kVec == 0);
  // Mode 2 copies along the output channels; modes 0 and 1 along the input channels, ungathered.
  const bool b_ok = mode == kModeConv2 ? cout % kVec == 0 : !has_in_idx && cin % kVec == 0;
  return aligned(x) && aligned(w) && a_ok && b_ok;
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
  TORCH_CHECK(mode == kModePlain || mode == kModeConv1 || mode == kModeConv2, "manidp::gated_conv: mode must be ",
              static_cast<int64_t>(kModePlain), ", ", static_cast<int64_t>(kModeConv1), " or ",
              static_cast<int64_t>(kModeConv2), "; got ", mode);
  const bool by_input = mode == kModeConv2;  // the conv2 weight layout (k*k, Cin, Cout)
  TORCH_CHECK(w_in.dim() == 3 && w_in.size(by_input ? 0 : 1) == ksize * ksize,
              "manidp::gated_conv: w must be (Cout, k*k, Cin), or (k*k, Cin, Cout) in the conv2 mode; got ",
              w_in.sizes());
  TORCH_CHECK(w_in.scalar_type() == x_in.scalar_type(), "manidp::gated_conv: x and w dtypes differ");
  const int64_t cout = w_in.size(by_input ? 2 : 0), cin = w_in.size(by_input ? 1 : 2);
  TORCH_CHECK(bias_in.scalar_type() == at::kFloat && bias_in.numel() == cout,
              "manidp::gated_conv: bias must be (Cout,) float32");
  TORCH_CHECK(block_m == 32 || block_m == 64 || block_m == 128, "manidp::gated_conv: block_m must be 32, 64 or 128");
  TORCH_CHECK(stride >= 1 && (ksize == 1 || ksize == 3), "manidp::gated_conv: ksize 1 or 3, stride >= 1");
  TORCH_CHECK(in_idx_in.has_value() == in_cnt_in.has_value(), "manidp::gated_conv: in_idx and in_cnt go together");
  TORCH_CHECK(out_idx_in.has_value() == out_cnt_in.has_value(), "manidp::gated_conv: out_idx and out_cnt go together");
  TORCH_CHECK(mode == kModeConv1 || !out_idx_in.has_value(),
              "manidp::gated_conv: out_idx/out_cnt belong to the conv1 mode (conv2 reads its active output "
              "channels from gate > 0)");
  TORCH_CHECK(mode != kModeConv1 || (out_idx_in.has_value() && gate_in.has_value()),
              "manidp::gated_conv: the conv1 mode needs out_idx/out_cnt and gate");
  TORCH_CHECK(mode != kModeConv2 || (gate_in.has_value() && res_in.has_value()),
              "manidp::gated_conv: the conv2 mode needs gate and res");
  c10::cuda::CUDAGuard guard(x_in.device());

  auto x = x_in.contiguous(), w = w_in.contiguous(), bias = bias_in.contiguous();
  const int64_t n = x.size(0), H = x.size(1), W = x.size(2), cbuf = x.size(3);
  const int64_t pad = ksize / 2;
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
      p.vec = use_wmma && can_copy_16_bytes(x, w, cbuf, cin, cout, p.has_in_idx, mode);
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
