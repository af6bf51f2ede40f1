// Gathered 3x3 convolution for one instance, without gathering weights (DESIGN 3.3).
//
// out[r, p] = epilogue(sum_{j, t} W[rows[r], cols[j], t] * X[j, tap_t(p)])
//
// W stays in its (Cout, Cin, 3, 3) layout: row rows[r] is read in place, and input channel j
// of the (compact) input uses the 9 weights at cols[j] * 9 of that row.  So neither the
// output-row gather of conv1 nor the row-and-column gather of conv2 is ever materialised,
// which matters at batch 1 where the late layers read each weight once.
//
// Implicit GEMM: the output pixels are cut into tiles of up to 64; each tile's input
// patches are copied into a (K, 64) panel (im2col, K = 9 * channels, in chunks that stay
// in L2), and a 6x64 AVX-512 register block accumulates 6 output rows x 64 pixels,
// broadcasting one weight per FMA row.  The epilogue is fused: bias, gate scale, ReLU and
// either the pooled mean (conv1, for gate 2) or the residual add written straight into
// the block output (conv2).
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "manidp_cpu.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define MANIDP_AVX512 __attribute__((target("avx512f,fma")))
#define MANIDP_HAVE_GCONV 1
#else
#define MANIDP_HAVE_GCONV 0
#endif

namespace manidp {
namespace detail {

bool gconv_available() {
#if MANIDP_HAVE_GCONV
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

#if MANIDP_HAVE_GCONV
namespace {

constexpr int kMR = 6;          // output rows per register block
constexpr int kNV = 4;          // 16-float vectors per pixel tile
constexpr int64_t kTile = 16 * kNV;
constexpr int64_t kPanelBytes = 512 * 1024;  // im2col chunk budget (L2 is 1 MiB on the target)

// im2col of pixels [p0, p0 + nt) of the channels [j0, j1) of x into panel (K_chunk, kTile),
// zero-filled past nt and outside the image (padding 1).
void im2col(const GConvArgs& a, int64_t j0, int64_t j1, int64_t p0, int64_t nt, float* panel) {
  for (int64_t j = j0; j < j1; ++j) {
    const float* xc = a.x + j * a.h * a.w;
    for (int ky = 0; ky < 3; ++ky) {
      for (int kx = 0; kx < 3; ++kx) {
        float* dst = panel + ((j - j0) * 9 + ky * 3 + kx) * kTile;
        int64_t i = 0;
        while (i < nt) {
          const int64_t p = p0 + i, oy = p / a.wo, ox0 = p % a.wo;
          const int64_t run = std::min(nt - i, a.wo - ox0);
          const int64_t iy = oy * a.stride + ky - 1;
          float* d = dst + i;
          if (iy < 0 || iy >= a.h) {
            std::memset(d, 0, run * sizeof(float));
          } else {
            const float* src = xc + iy * a.w;
            // Output columns whose tap falls inside the row: [lo, hi).
            const int64_t first = ox0 * a.stride + kx - 1;
            int64_t lo = 0, hi = run;
            while (lo < run && first + lo * a.stride < 0) d[lo++] = 0.f;
            while (hi > lo && first + (hi - 1) * a.stride >= a.w) d[--hi] = 0.f;
            if (a.stride == 1) {
              std::memcpy(d + lo, src + first + lo, (hi - lo) * sizeof(float));
            } else {
              for (int64_t q = lo; q < hi; ++q) d[q] = src[first + q * a.stride];
            }
          }
          i += run;
        }
        if (nt < kTile) std::memset(dst + nt, 0, (kTile - nt) * sizeof(float));
      }
    }
  }
}

// Accumulates MR rows x NV vectors over input channels [j0, j1) of the panel; `acc` holds the
// running sums (loaded and stored by the caller).
template <int MR, int NV>
MANIDP_AVX512 inline void micro(const float* const* wrow, const int32_t* cols, int64_t j0, int64_t j1,
                                const float* panel, __m512 (&acc)[kMR][kNV]) {
  const float* b = panel;
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t off = (cols ? static_cast<int64_t>(cols[j]) : j) * 9;
    const float* wp[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) wp[r] = wrow[r] + off;
#pragma GCC unroll 1
    for (int t = 0; t < 9; ++t) {
      __m512 bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
      b += kTile;
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 wv = _mm512_set1_ps(wp[r][t]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(wv, bv[v], acc[r][v]);
      }
    }
  }
}

// Where a register block's partial sums live between channel chunks, and what happens after.
struct Step {
  int64_t j0, j1;      // channel chunk
  const float* panel;  // its im2col panel
  float* partial;      // (kMR, kTile) partial sums of this block
  bool first, last;
};

// One register block: rows [m0, m0 + MR) x pixel tile [p0, p0 + nt) over one channel chunk;
// on the last chunk the fused epilogue writes the output.
template <int MR, int NV>
MANIDP_AVX512 void block(const GConvArgs& a, int64_t m0, int64_t p0, int64_t nt, const Step& s) {
  __m512 acc[kMR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = s.first ? _mm512_setzero_ps() : _mm512_loadu_ps(s.partial + r * kTile + 16 * v);
  const float* wrow[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) wrow[r] = a.weight + static_cast<int64_t>(a.rows[m0 + r]) * a.ldw;
  micro<MR, NV>(wrow, a.cols, s.j0, s.j1, s.panel, acc);
  if (!s.last) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s.partial + r * kTile + 16 * v, acc[r][v]);
    return;
  }
  // Fused epilogue on the valid lanes of the tile.
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const int64_t m = m0 + r;
    const __m512 bias = _mm512_set1_ps(a.bias[m]);
    const __m512 scale = _mm512_set1_ps(a.scale ? a.scale[m] : 1.f);
    __m512 psum = zero;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const int64_t valid = nt - 16 * v;
      const __mmask16 k = valid >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << valid) - 1u);
      __m512 y = _mm512_mul_ps(scale, _mm512_add_ps(acc[r][v], bias));
      if (a.residual) {
        const int64_t off = static_cast<int64_t>(a.out_rows[m]) * a.hw + p0 + 16 * v;
        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(k, a.residual + off));
        _mm512_mask_storeu_ps(a.out + off, k, _mm512_max_ps(y, zero));
      } else {
        y = _mm512_max_ps(y, zero);
        _mm512_mask_storeu_ps(a.out + m * a.hw + p0 + 16 * v, k, y);
        psum = _mm512_add_ps(psum, _mm512_maskz_mov_ps(k, y));
      }
    }
    if (a.pooled) a.pooled[m] += _mm512_reduce_add_ps(psum);
  }
}

template <int MR>
void block_nv(const GConvArgs& a, int64_t m0, int64_t p0, int64_t nt, const Step& s) {
  switch ((nt + 15) / 16) {
    case 1: block<MR, 1>(a, m0, p0, nt, s); break;
    case 2: block<MR, 2>(a, m0, p0, nt, s); break;
    case 3: block<MR, 3>(a, m0, p0, nt, s); break;
    default: block<MR, 4>(a, m0, p0, nt, s); break;
  }
}

void block_any(const GConvArgs& a, int64_t m0, int mr, int64_t p0, int64_t nt, const Step& s) {
  switch (mr) {
    case 1: block_nv<1>(a, m0, p0, nt, s); break;
    case 2: block_nv<2>(a, m0, p0, nt, s); break;
    case 3: block_nv<3>(a, m0, p0, nt, s); break;
    case 4: block_nv<4>(a, m0, p0, nt, s); break;
    case 5: block_nv<5>(a, m0, p0, nt, s); break;
    default: block_nv<6>(a, m0, p0, nt, s); break;
  }
}

// Rows blocks [b0, b1) of the whole output: tile by tile, chunk by chunk.
void run_blocks(const GConvArgs& a, int64_t b0, int64_t b1) {
  const int64_t per_chunk = std::max<int64_t>(1, kPanelBytes / (9 * kTile * static_cast<int64_t>(sizeof(float))));
  const int64_t chunk = std::min(per_chunk, a.nch);
  std::vector<float> panel(9 * chunk * kTile + 16);
  const bool chunked = chunk < a.nch;
  std::vector<float> partial(chunked ? (b1 - b0) * kMR * kTile : 0);
  for (int64_t p0 = 0; p0 < a.hw; p0 += kTile) {
    const int64_t nt = std::min(kTile, a.hw - p0);
    for (int64_t j0 = 0; j0 < a.nch; j0 += chunk) {
      const int64_t j1 = std::min(a.nch, j0 + chunk);
      im2col(a, j0, j1, p0, nt, panel.data());
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * kMR;
        const Step s{j0, j1, panel.data(), chunked ? partial.data() + (b - b0) * kMR * kTile : nullptr, j0 == 0,
                     j1 == a.nch};
        block_any(a, m0, static_cast<int>(std::min<int64_t>(kMR, a.m - m0)), p0, nt, s);
      }
    }
  }
}

}  // namespace
#endif  // MANIDP_HAVE_GCONV

void gconv(const GConvArgs& a) {
#if MANIDP_HAVE_GCONV
  TORCH_CHECK(gconv_available(), "manidp: gconv needs a CPU with AVX-512F");
  if (a.m <= 0) return;
  if (a.pooled) std::fill(a.pooled, a.pooled + a.m, 0.f);
  // Threads split the output rows; each builds its own panels (the im2col is cheap next to
  // the GEMM once a thread owns a few register blocks, and needs no barrier).
  const int64_t nblocks = (a.m + kMR - 1) / kMR;
  at::parallel_for(0, nblocks, 2, [&](int64_t b0, int64_t b1) { run_blocks(a, b0, b1); });
  if (a.pooled)
    for (int64_t m = 0; m < a.m; ++m) a.pooled[m] /= static_cast<float>(a.hw);
#else
  TORCH_CHECK(false, "manidp: gconv is not built for this platform");
#endif
}

}  // namespace detail
}  // namespace manidp
