// Gathered 3x3 convolution for one instance that reads weights in place (DESIGN 3.3).
//
//   y[r, p] = scale[r] * (bias[r] + sum_{j, t} W[rows[r], col(j), t] * X[j, tap_t(p)])
//
// W stays in its (Cout, Cin, 3, 3) layout: row rows[r] is read where it is, and input
// channel j of the (compact) input uses the 9 weights at col(j) * 9 of that row.  Neither
// the output-row gather of conv1 nor the row-and-column gather of conv2 is materialised;
// at batch 1 the late layers read each weight once, so this is what makes them fast.
//
// Implicit GEMM without im2col: the input is stored as row-padded planes (see below) in
// which every tap of a run of output pixels is a contiguous run of floats, so the B operand
// is read straight from the planes (masked loads supply the left/right zero padding).  A
// 6 x 64 AVX-512 register block accumulates 6 output rows x 64 pixels, broadcasting one
// weight per row and tap.  The epilogue is fused: bias, gate scale, ReLU, then either the
// pooled mean (conv1, for gate 2) or the residual add; conv1 writes conv2's input planes
// directly.
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
// Output pixels are numbered q = oy * wo + ox (no junk lanes), and tap t = (ky, kx) of pixel
// q reads buf[j * cstride + toff[t] + q]; taps that would read the column left of the image
// (kx = 0 at ox = 0) or right of it (kx = 2 at ox = wo - 1, stride 1) are masked to zero.
// Stride 1: per channel a zero row, the h rows, a zero row (rows of w floats), starting at
// offset 1, so toff = ky * w + kx.
// Stride 2: the padded image split into 4 phase planes, rows {even padded rows (the first is
// the top padding), odd padded rows} x columns {odd input columns 1, 3, .. ("B0"), even input columns
// 0, 2, .. ("B1")}, each of rows of wo floats starting at offset 1.  kx = 1 reads B1 at ox,
// kx = 2 reads B0 at ox, kx = 0 reads B0 at ox - 1 (masked at ox = 0).  An odd width leaves
// B0's last column zero: it is the right padding.
// Each channel has slack past its data so that whole vectors of the last tile stay in bounds.

static int64_t round16(int64_t v) { return (v + 15) / 16 * 16; }

PlaneGeometry plane_geometry(int64_t h, int64_t w, int64_t stride) {
  TORCH_CHECK(stride == 1 || stride == 2, "manidp: gconv supports stride 1 or 2; got ", stride);
  PlaneGeometry g;
  g.h = h; g.w = w; g.stride = stride;
  g.ho = (h - 1) / stride + 1;
  g.wo = (w - 1) / stride + 1;
  if (stride == 1) {
    g.psize = (h + 2) * w + 2;
    g.cstride = round16(g.psize + 16);  // last vector: q <= ho * w + 15, tap offset <= 2 * w + 2
    for (int t = 0; t < 9; ++t) g.toff[t] = (t / 3) * w + t % 3;
  } else {
    g.psize = (g.ho + 1) * g.wo + 2;
    g.cstride = round16(4 * g.psize + 16);
    for (int t = 0; t < 9; ++t) {
      const int ky = t / 3, kx = t % 3;
      const int64_t plane = (ky & 1) * 2 + (kx == 1 ? 1 : 0);
      g.toff[t] = plane * g.psize + 1 + (ky >> 1) * g.wo + (kx == 0 ? -1 : 0);
    }
  }
  return g;
}

void pack_planes(const PlaneGeometry& g, const float* x, int64_t nch, float* buf) {
  // Chunks of at least ~32K floats: below that a thread hand-off costs more than the copy.
  at::parallel_for(0, nch, std::max<int64_t>(1, 32768 / g.cstride), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      float* dst = buf + j * g.cstride;
      const float* src = x + j * g.h * g.w;
      std::memset(dst, 0, g.cstride * sizeof(float));
      if (g.stride == 1) {
        std::memcpy(dst + 1 + g.w, src, g.h * g.w * sizeof(float));  // rows are contiguous
        continue;
      }
      for (int64_t iy = 0; iy < g.h; ++iy) {
        // padded row py = iy + 1: even rows go to row plane 0 (whose row 0 is the top padding),
        // odd rows to row plane 1, at row py / 2
        const int64_t py = iy + 1, rp = py & 1, i = py >> 1;
        float* b0 = dst + (rp * 2) * g.psize + 1 + i * g.wo;  // odd input columns
        float* b1 = b0 + g.psize;                             // even input columns
        const float* s = src + iy * g.w;
        for (int64_t jx = 0; 2 * jx < g.w; ++jx) b1[jx] = s[2 * jx];
        for (int64_t jx = 0; 2 * jx + 1 < g.w; ++jx) b0[jx] = s[2 * jx + 1];
      }
    }
  });
}

#if MANIDP_HAVE_GCONV
namespace {

constexpr int kMR = 6;  // output rows per register block
constexpr int kNV = 4;  // 16-float vectors per pixel tile
constexpr int64_t kTile = 16 * kNV;

// Lane masks of the vectors of one tile [q0, q0 + 64): real pixels, and the lanes where the
// kx = 0 / kx = 2 taps read inside the image.
struct TileMap {
  int nv = 0;
  __mmask16 valid[kNV] = {};
  __mmask16 left[kNV] = {};
  __mmask16 right[kNV] = {};
};

TileMap tile_map(const GConvArgs& a, int64_t q0, int64_t qend) {
  const PlaneGeometry& g = a.geom;
  TileMap t;
  t.nv = static_cast<int>(std::min<int64_t>(kNV, (qend - q0 + 15) / 16));
  int64_t ox = q0 % g.wo;
  for (int v = 0; v < t.nv; ++v) {
    for (int l = 0; l < 16; ++l, ox = (ox + 1 == g.wo) ? 0 : ox + 1) {
      const __mmask16 bit = static_cast<__mmask16>(1u << l);
      if (q0 + 16 * v + l < qend) t.valid[v] |= bit;
      if (ox != 0) t.left[v] |= bit;
      if (g.stride != 1 || ox != g.wo - 1) t.right[v] |= bit;
    }
  }
  return t;
}

// acc[r][v] += sum over channels [j0, j1) and taps of w[r][col(j) * 9 + t] * B(j, t, q0 + 16 v).
template <int MR, int NV>
MANIDP_AVX512 inline void micro(const GConvArgs& a, const float* const* wrow, int64_t j0, int64_t j1, int64_t q0,
                                const TileMap& tm, __m512 (&acc)[kMR][kNV]) {
  const int64_t* toff = a.geom.toff;
  const float* bj = a.in + j0 * a.geom.cstride + q0;
  __mmask16 ml[NV], mr[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    ml[v] = tm.left[v];
    mr[v] = tm.right[v];
  }
  for (int64_t j = j0; j < j1; ++j, bj += a.geom.cstride) {
    const int64_t off = (a.cols ? static_cast<int64_t>(a.cols[j]) : j) * 9;
    const float* wp[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) wp[r] = wrow[r] + off;
#pragma GCC unroll 1
    for (int ky = 0; ky < 3; ++ky) {
#pragma GCC unroll 3
      for (int kx = 0; kx < 3; ++kx) {
        const int t = ky * 3 + kx;
        const float* b = bj + toff[t];
        __m512 bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v)
          bv[v] = kx == 1 ? _mm512_loadu_ps(b + 16 * v) : _mm512_maskz_loadu_ps(kx == 0 ? ml[v] : mr[v], b + 16 * v);
#pragma GCC unroll 8
        for (int r = 0; r < MR; ++r) {
          const __m512 wv = _mm512_set1_ps(wp[r][t]);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(wv, bv[v], acc[r][v]);
        }
      }
    }
  }
}

// One register block: rows [m0, m0 + MR) x tile q0, all input channels, fused epilogue.
template <int MR, int NV>
MANIDP_AVX512 void block(const GConvArgs& a, int64_t m0, int64_t q0, const TileMap& tm, float* pooled) {
  __m512 acc[kMR][kNV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* wrow[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) wrow[r] = a.weight + static_cast<int64_t>(a.rows[m0 + r]) * a.ldw;
  micro<MR, NV>(a, wrow, 0, a.nch, q0, tm, acc);

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
      float* dst = a.out + chan + a.out_offset + q0 + 16 * v;
      if (a.residual) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(tm.valid[v], a.residual + (dst - a.out)));
      y = _mm512_max_ps(zero, y);  // operand order: a NaN y passes through, as torch.relu
      _mm512_mask_storeu_ps(dst, tm.valid[v], y);
      if (pooled) psum = _mm512_add_ps(psum, _mm512_maskz_mov_ps(tm.valid[v], y));
    }
    if (pooled) pooled[m] += _mm512_reduce_add_ps(psum);
  }
}

template <int MR>
void block_nv(const GConvArgs& a, int64_t m0, int64_t q0, const TileMap& tm, float* pooled) {
  switch (tm.nv) {
    case 1: block<MR, 1>(a, m0, q0, tm, pooled); break;
    case 2: block<MR, 2>(a, m0, q0, tm, pooled); break;
    case 3: block<MR, 3>(a, m0, q0, tm, pooled); break;
    default: block<MR, 4>(a, m0, q0, tm, pooled); break;
  }
}

// Register block of mr (1..kMR) rows.
template <int MR = kMR>
void block_any(const GConvArgs& a, int64_t m0, int mr, int64_t q0, const TileMap& tm, float* pooled) {
  if constexpr (MR > 1) {
    if (mr < MR) return block_any<MR - 1>(a, m0, mr, q0, tm, pooled);
  }
  block_nv<MR>(a, m0, q0, tm, pooled);
}

// Work items [i0, i1) of the (tile, row block) grid over the pixels below qend, tile-major:
// consecutive items share a tile, whose input stays in L1/L2 while the row blocks sweep it.
// Pooled sums (if any) are added to `pooled`.
void run_items(const GConvArgs& a, int64_t qend, int64_t nblocks, int64_t i0, int64_t i1, float* pooled) {
  int64_t cur = -1;
  TileMap tm;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t tile = i / nblocks, m0 = (i % nblocks) * kMR;
    if (tile != cur) {
      tm = tile_map(a, tile * kTile, qend);
      cur = tile;
    }
    block_any(a, m0, static_cast<int>(std::min<int64_t>(kMR, a.m - m0)), tile * kTile, tm, pooled);
  }
}

// Pixels [q0, q0 + np) of output row m as dot products along K with their patches `col`.
MANIDP_AVX512 void tail_row(const GConvArgs& a, int64_t m, const float* col, int64_t np, int64_t q0) {
  const int64_t k = a.nch * 9;
  const float* wrow = a.weight + static_cast<int64_t>(a.rows[m]) * a.ldw;
  const int64_t chan = (a.out_chans ? static_cast<int64_t>(a.out_chans[m]) : m) * a.out_chan_stride;
  for (int64_t p = 0; p < np; ++p) {
    const float* c = col + p * k;
    __m512 acc = _mm512_setzero_ps();
    if (a.cols == nullptr) {  // conv1: the weight row is contiguous along K
      int64_t i = 0;
      for (; i + 16 <= k; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(wrow + i), _mm512_loadu_ps(c + i), acc);
      const __mmask16 rest = static_cast<__mmask16>((1u << (k - i)) - 1u);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rest, wrow + i), _mm512_maskz_loadu_ps(rest, c + i), acc);
    } else {  // conv2: 9 weights per active input channel
      const __mmask16 nine = 0x1FF;
      for (int64_t j = 0; j < a.nch; ++j)
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(nine, wrow + static_cast<int64_t>(a.cols[j]) * 9),
                              _mm512_maskz_loadu_ps(nine, c + j * 9), acc);
    }
    float y = (a.scale ? a.scale[m] : 1.f) * (_mm512_reduce_add_ps(acc) + a.bias[m]);
    float* dst = a.out + chan + a.out_offset + q0 + p;
    if (a.residual) y += a.residual[dst - a.out];
    y = y < 0.f ? 0.f : y;  // NaN passes through, as torch.relu
    *dst = y;
    if (a.pooled) a.pooled[m] += y;
  }
}

// Output pixels [q0, qend) as dot products along K, for the few pixels of a map just past a
// multiple of 16 (7 x 7 = 3 * 16 + 1): in the register blocks they would fill a vector of
// mostly idle lanes that costs as much as 16 pixels, here they cost 1/16 (conv1) or 1/9 (conv2).
void tail_pixels(const GConvArgs& a, int64_t q0, int64_t qend) {
  const PlaneGeometry& g = a.geom;
  const int64_t np = qend - q0, k = a.nch * 9;
  std::vector<float> col(np * k);  // the pixels' input patches, zero where the tap is padding
  for (int64_t p = 0; p < np; ++p) {
    const int64_t q = q0 + p, ox = q % g.wo;
    for (int t = 0; t < 9; ++t) {
      const int kx = t % 3;
      const bool pad = (kx == 0 && ox == 0) || (kx == 2 && g.stride == 1 && ox == g.wo - 1);
      for (int64_t j = 0; j < a.nch; ++j) col[p * k + j * 9 + t] = pad ? 0.f : a.in[j * g.cstride + g.toff[t] + q];
    }
  }
  at::parallel_for(0, a.m, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) tail_row(a, m, col.data(), np, q0);
  });
}

}  // namespace
#endif  // MANIDP_HAVE_GCONV

void gconv(const GConvArgs& a) {
#if MANIDP_HAVE_GCONV
  TORCH_CHECK(gconv_available(), "manidp: gconv needs a CPU with AVX-512F");
  if (a.m <= 0) return;
  if (a.pooled) std::fill(a.pooled, a.pooled + a.m, 0.f);
  const int64_t qend = a.geom.ho * a.geom.wo;
  // 1 to 4 pixels past a multiple of 16 go to tail_pixels (7x7: 49 = 48 + 1, 14x14: 196 = 192 + 4).
  const int64_t rest = qend % 16;
  const int64_t qmain = (qend > 16 && rest <= 4) ? qend - rest : qend;
  const int64_t ntiles = (qmain + kTile - 1) / kTile;
  const int64_t nblocks = (a.m + kMR - 1) / kMR;
  const int64_t items = ntiles * nblocks;
  const int64_t nthreads = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (nthreads == 1 || items == 1) {
    run_items(a, qmain, nblocks, 0, items, a.pooled);
  } else {
    // Threads take equal runs of the (tile, row block) grid: balanced to one item whatever the
    // shape (late layers: one tile, many row blocks; early layers: many tiles, few blocks).
    // A row's pooled sum may come from two threads, so each thread has its own slots.
    std::vector<float> partial(a.pooled ? nthreads * a.m : 0, 0.f);
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      run_items(a, qmain, nblocks, i0, i1, a.pooled ? partial.data() + at::get_thread_num() * a.m : nullptr);
    });
    if (a.pooled)
      for (int64_t t = 0; t < nthreads; ++t)
        for (int64_t m = 0; m < a.m; ++m) a.pooled[m] += partial[t * a.m + m];
  }
  if (qmain < qend) tail_pixels(a, qmain, qend);
  if (a.pooled) {
    const float inv = 1.f / static_cast<float>(qend);
    for (int64_t m = 0; m < a.m; ++m) a.pooled[m] *= inv;
  }
#else
  TORCH_CHECK(false, "manidp: gconv is not built for this platform");
#endif
}

}  // namespace detail
}  // namespace manidp
