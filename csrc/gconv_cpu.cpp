// Gathered 3x3 convolution for one instance that reads weights in place (DESIGN 3.3).
//
//   y[r, p] = scale[r] * (bias[r] + sum_{j, t} W[rows[r], col(j), t] * X[j, tap_t(p)])
//
// W stays in its (Cout, Cin, 3, 3) layout: row rows[r] is read where it is, and input
// channel j of the (compact) input uses the 9 weights at col(j) * 9 of that row.  Neither
// the output-row gather of conv1 nor the row-and-column gather of conv2 is materialised;
// at batch 1 the late layers read each weight once, so this is what makes them fast.
//
// Implicit GEMM without im2col: the input is stored as zero-padded planes (see Planes) in
// which every tap of a run of output pixels is a contiguous run of floats, so the B operand
// is read straight from the planes.  A 6 x 64 AVX-512 register block accumulates 6 output
// rows x 64 pixels, broadcasting one weight per row and tap.  The epilogue is fused: bias,
// gate scale, ReLU, then either the pooled mean (conv1, for gate 2) or the residual add,
// storing through an OutMap (conv1 writes conv2's padded input planes directly).
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

// ------------------------------------------------------------------ planes
//
// Stride 1: one zero-padded (h + 2) x (w + 2) plane per channel.  Output pixel (oy, ox) has
// q = oy * wq + ox with wq = w + 2 (columns ox >= wo are junk lanes, never stored) and tap
// (ky, kx) reads plane[q + ky * wq + kx].
// Stride 2: the padded image split into 4 phase planes (even/odd rows x even/odd columns) of
// (ho + 1) x (wo + 1); q = oy * wq + ox with wq = wo + 1, and tap (ky, kx) reads phase
// (ky & 1, kx & 1) at q + (ky >> 1) * wq + (kx >> 1).  Either way a run of consecutive q is a
// run of consecutive floats for every tap.  Each channel has slack past its last plane so
// that whole vectors of the last tile stay in bounds.

static int64_t round16(int64_t v) { return (v + 15) / 16 * 16; }

PlaneGeometry plane_geometry(int64_t h, int64_t w, int64_t stride) {
  TORCH_CHECK(stride == 1 || stride == 2, "manidp: gconv supports stride 1 or 2; got ", stride);
  PlaneGeometry g;
  g.h = h; g.w = w; g.stride = stride;
  g.ho = (h - 1) / stride + 1;
  g.wo = (w - 1) / stride + 1;
  if (stride == 1) {
    g.wq = w + 2;
    g.hq = h + 2;
    g.psize = g.hq * g.wq;
    g.cstride = round16(g.psize + 18);  // last vector: q <= ho * wq + 15, tap offset <= 2 * wq + 2
    for (int t = 0; t < 9; ++t) g.toff[t] = (t / 3) * g.wq + t % 3;
  } else {
    g.wq = g.wo + 1;
    g.hq = g.ho + 1;
    g.psize = g.hq * g.wq;
    g.cstride = round16(4 * g.psize + 17);
    for (int t = 0; t < 9; ++t) {
      const int ky = t / 3, kx = t % 3;
      g.toff[t] = ((ky & 1) * 2 + (kx & 1)) * g.psize + (ky >> 1) * g.wq + (kx >> 1);
    }
  }
  return g;
}

void pack_planes(const PlaneGeometry& g, const float* x, int64_t nch, float* buf) {
  at::parallel_for(0, nch, 8, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      float* dst = buf + j * g.cstride;
      const float* src = x + j * g.h * g.w;
      std::memset(dst, 0, g.cstride * sizeof(float));
      if (g.stride == 1) {
        for (int64_t iy = 0; iy < g.h; ++iy) std::memcpy(dst + (iy + 1) * g.wq + 1, src + iy * g.w, g.w * sizeof(float));
      } else {
        for (int64_t iy = 0; iy < g.h; ++iy) {
          const int64_t py = iy + 1;
          float* row_even = dst + ((py & 1) * 2) * g.psize + (py >> 1) * g.wq;  // phase (py & 1, px even)
          float* row_odd = row_even + g.psize;                                  // phase (py & 1, px odd)
          const float* s = src + iy * g.w;
          for (int64_t ix = 0; ix < g.w; ++ix) {
            const int64_t px = ix + 1;
            ((px & 1) ? row_odd : row_even)[px >> 1] = s[ix];
          }
        }
      }
    }
  });
}

#if MANIDP_HAVE_GCONV
namespace {

constexpr int kMR = 6;  // output rows per register block
constexpr int kNV = 4;  // 16-float vectors per pixel tile
constexpr int64_t kTile = 16 * kNV;
constexpr int kMaxSeg = 4;  // output rows one vector can touch (wq >= 6)

// Output runs of one 16-lane vector: lanes in `mask` go to out + off + lane.
struct Seg {
  __mmask16 mask;
  int64_t off;
};
struct TileMap {
  int nv = 0;
  int nseg[kNV] = {};
  Seg seg[kNV][kMaxSeg];
  __mmask16 valid[kNV] = {};
};

// Which lanes of tile [q0, q0 + 64) are real output pixels, and where they go.
TileMap tile_map(const GConvArgs& a, int64_t q0) {
  const PlaneGeometry& g = a.geom;
  TileMap t;
  const int64_t qend = g.ho * g.wq;
  t.nv = static_cast<int>(std::min<int64_t>(kNV, (qend - q0 + 15) / 16));
  int64_t oy = q0 / g.wq, ox = q0 % g.wq;  // walked lane by lane (no division per lane)
  for (int v = 0; v < t.nv; ++v) {
    int64_t cur_row = -1;
    for (int l = 0; l < 16; ++l, ++ox) {
      if (ox == g.wq) {
        ox = 0;
        ++oy;
      }
      if (oy >= g.ho || ox >= g.wo) continue;
      if (oy != cur_row) {
        TORCH_CHECK(t.nseg[v] < kMaxSeg, "manidp: gconv output rows too narrow");
        // lane l of this row maps to oy * row_stride + ox = off + l
        t.seg[v][t.nseg[v]++] = Seg{0, a.out_offset + oy * a.out_row_stride + ox - l};
        cur_row = oy;
      }
      t.seg[v][t.nseg[v] - 1].mask |= static_cast<__mmask16>(1u << l);
      t.valid[v] |= static_cast<__mmask16>(1u << l);
    }
  }
  return t;
}

// acc[r][v] += sum over channels [j0, j1) and taps of w[r][col(j) * 9 + t] * B(j, t, q0 + 16 v).
template <int MR, int NV>
MANIDP_AVX512 inline void micro(const GConvArgs& a, const float* const* wrow, int64_t j0, int64_t j1, int64_t q0,
                                __m512 (&acc)[kMR][kNV]) {
  const int64_t* toff = a.geom.toff;
  const float* bj = a.in + j0 * a.geom.cstride + q0;
  for (int64_t j = j0; j < j1; ++j, bj += a.geom.cstride) {
    const int64_t off = (a.cols ? static_cast<int64_t>(a.cols[j]) : j) * 9;
    const float* wp[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) wp[r] = wrow[r] + off;
#pragma GCC unroll 1
    for (int t = 0; t < 9; ++t) {
      const float* b = bj + toff[t];
      __m512 bv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) bv[v] = _mm512_loadu_ps(b + 16 * v);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const __m512 wv = _mm512_set1_ps(wp[r][t]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(wv, bv[v], acc[r][v]);
      }
    }
  }
}

// One register block: rows [m0, m0 + MR) x tile q0, all input channels, fused epilogue.
template <int MR, int NV>
MANIDP_AVX512 void block(const GConvArgs& a, int64_t m0, int64_t q0, const TileMap& tm) {
  __m512 acc[kMR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* wrow[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) wrow[r] = a.weight + static_cast<int64_t>(a.rows[m0 + r]) * a.ldw;
  micro<MR, NV>(a, wrow, 0, a.nch, q0, acc);

  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const int64_t m = m0 + r;
    const int64_t chan = (a.out_chans ? static_cast<int64_t>(a.out_chans[m]) : m) * a.out_chan_stride;
    const __m512 bias = _mm512_set1_ps(a.bias[m]);
    const __m512 scale = _mm512_set1_ps(a.scale ? a.scale[m] : 1.f);
    __m512 psum = zero;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m512 y = _mm512_mul_ps(scale, _mm512_add_ps(acc[r][v], bias));
      if (a.residual) {
        __m512 res = zero;
        for (int s = 0; s < tm.nseg[v]; ++s)
          res = _mm512_mask_loadu_ps(res, tm.seg[v][s].mask, a.residual + chan + tm.seg[v][s].off);
        y = _mm512_add_ps(y, res);
      }
      y = _mm512_max_ps(zero, y);  // operand order: a NaN y passes through, as torch.relu
      for (int s = 0; s < tm.nseg[v]; ++s) _mm512_mask_storeu_ps(a.out + chan + tm.seg[v][s].off, tm.seg[v][s].mask, y);
      if (a.pooled) psum = _mm512_add_ps(psum, _mm512_maskz_mov_ps(tm.valid[v], y));
    }
    if (a.pooled) a.pooled[m] += _mm512_reduce_add_ps(psum);
  }
}

template <int MR>
void block_nv(const GConvArgs& a, int64_t m0, int64_t q0, const TileMap& tm) {
  switch (tm.nv) {
    case 1: block<MR, 1>(a, m0, q0, tm); break;
    case 2: block<MR, 2>(a, m0, q0, tm); break;
    case 3: block<MR, 3>(a, m0, q0, tm); break;
    default: block<MR, 4>(a, m0, q0, tm); break;
  }
}

void block_any(const GConvArgs& a, int64_t m0, int mr, int64_t q0, const TileMap& tm) {
  switch (mr) {
    case 1: block_nv<1>(a, m0, q0, tm); break;
    case 2: block_nv<2>(a, m0, q0, tm); break;
    case 3: block_nv<3>(a, m0, q0, tm); break;
    case 4: block_nv<4>(a, m0, q0, tm); break;
    case 5: block_nv<5>(a, m0, q0, tm); break;
    default: block_nv<6>(a, m0, q0, tm); break;
  }
}

}  // namespace
#endif  // MANIDP_HAVE_GCONV

void gconv(const GConvArgs& a) {
#if MANIDP_HAVE_GCONV
  TORCH_CHECK(gconv_available(), "manidp: gconv needs a CPU with AVX-512F");
  if (a.m <= 0) return;
  if (a.pooled) std::fill(a.pooled, a.pooled + a.m, 0.f);
  const int64_t qend = a.geom.ho * a.geom.wq;
  const int64_t ntiles = (qend + kTile - 1) / kTile;
  const int64_t nblocks = (a.m + kMR - 1) / kMR;
  // Threads split the row blocks (each thread then streams only its own weight rows); a
  // thread walks its rows tile by tile so the tile's input stays in L1/L2.
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t tile = 0; tile < ntiles; ++tile) {
      const int64_t q0 = tile * kTile;
      const TileMap tm = tile_map(a, q0);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * kMR;
        block_any(a, m0, static_cast<int>(std::min<int64_t>(kMR, a.m - m0)), q0, tm);
      }
    }
  });
  if (a.pooled) {
    const float inv = 1.f / static_cast<float>(a.geom.ho * a.geom.wo);
    for (int64_t m = 0; m < a.m; ++m) a.pooled[m] *= inv;
  }
#else
  TORCH_CHECK(false, "manidp: gconv is not built for this platform");
#endif
}

}  // namespace detail
}  // namespace manidp
