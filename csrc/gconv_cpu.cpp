// Gathered 3x3 convolution for one instance that reads weights in place (docs/DESIGN.md 7.6).
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
// register block accumulates a few output rows x a few vectors of pixels, broadcasting one
// weight per row and tap.  The epilogue is fused: bias, gate scale, the residual add (conv2),
// ReLU, and the pooled mean (conv1, for gate 2; in the whole-network runner also conv2 and the
// stem, for the next gate 1); conv1 writes conv2's input planes directly.
//
// This file holds the plane layout and picks the kernel; the kernel itself is written once
// (gconv_kernel.h) and compiled for AVX-512 (gconv_avx512.cpp) and for AVX2 + FMA
// (gconv_avx2.cpp).  The widest one the CPU runs is used, unless MANIDP_GCONV_ISA
// (avx512, avx2 or off) says otherwise; `off` makes every conv gather weights for the
// library conv instead.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "manidp_cpu.h"

namespace manidp {
namespace detail {

bool gconv_avx512_supported();
bool gconv_avx2_supported();
void gconv_avx512(const GConvArgs& a);
void gconv_avx2(const GConvArgs& a);
void gconv_team_avx512(const GConvArgs& a, ChunkCounter* states, int64_t team, int64_t rank, float* pooled);
void gconv_team_avx2(const GConvArgs& a, ChunkCounter* states, int64_t team, int64_t rank, float* pooled);
int64_t gconv_tiles_avx512(const GConvArgs& a);
int64_t gconv_tiles_avx2(const GConvArgs& a);

namespace {

enum class GConvIsa { kNone, kAvx2, kAvx512 };

GConvIsa pick_isa() {
  const char* env = std::getenv("MANIDP_GCONV_ISA");
  const std::string want = env ? env : "auto";
  if (want == "off") return GConvIsa::kNone;
  if (want == "avx512" || want == "auto")
    if (gconv_avx512_supported()) return GConvIsa::kAvx512;
  if (want == "avx2" || want == "avx512" || want == "auto")
    if (gconv_avx2_supported()) return GConvIsa::kAvx2;
  TORCH_CHECK(want == "auto" || want == "avx512" || want == "avx2",
              "manidp: MANIDP_GCONV_ISA must be auto, avx512, avx2 or off; got '", want, "'");
  return GConvIsa::kNone;
}

// Read once: the choice must not change between the calls of one forward.
GConvIsa isa() {
  static const GConvIsa chosen = pick_isa();
  return chosen;
}

}  // namespace

bool gconv_available() { return isa() != GConvIsa::kNone; }

std::string gconv_isa_name() {
  switch (isa()) {
    case GConvIsa::kAvx512: return "avx512";
    case GConvIsa::kAvx2: return "avx2";
    default: return "none";
  }
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
  g.ho = conv_out_size(h, 3, stride, 1);
  g.wo = conv_out_size(w, 3, stride, 1);
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
  pack_planes(g, x, g.h * g.w, nch, buf);
}

// One channel's map (g.h, g.w) into its four phase planes at dst (zeroed), for a stride-2 conv.
MANIDP_MULTIVERSION static void pack_phases(const PlaneGeometry& g, const float* __restrict src,
                                            float* __restrict dst) {
  const int64_t pairs = g.w / 2;
  for (int64_t iy = 0; iy < g.h; ++iy) {
    // padded row py = iy + 1: even rows go to row plane 0 (whose row 0 is the top padding),
    // odd rows to row plane 1, at row py / 2
    const int64_t py = iy + 1, rp = py & 1, i = py >> 1;
    float* b0 = dst + (rp * 2) * g.psize + 1 + i * g.wo;  // odd input columns
    float* b1 = b0 + g.psize;                             // even input columns
    const float* s = src + iy * g.w;
#pragma omp simd
    for (int64_t jx = 0; jx < pairs; ++jx) {
      b1[jx] = s[2 * jx];
      b0[jx] = s[2 * jx + 1];
    }
    if (g.w % 2) b1[pairs] = s[g.w - 1];
  }
}

void pack_planes(const PlaneGeometry& g, const float* x, int64_t x_cstride, int64_t nch, float* buf) {
  // Chunks of at least ~32K floats: below that a thread hand-off costs more than the copy.
  at::parallel_for(0, nch, std::max<int64_t>(1, 32768 / g.cstride), [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      float* dst = buf + j * g.cstride;
      const float* src = x + j * x_cstride;
      std::memset(dst, 0, g.cstride * sizeof(float));
      if (g.stride == 1)
        std::memcpy(dst + 1 + g.w, src, g.h * g.w * sizeof(float));  // rows are contiguous
      else
        pack_phases(g, src, dst);
    }
  });
}

void pool_relu_pack(const float* y, int64_t hy, int64_t wy, int64_t c, const PlaneGeometry& g, int64_t r0, int64_t r1,
                    float* planes, float* sums, float* row) {
  for (int64_t oy = r0; oy < r1; ++oy) {
    const int64_t iy0 = std::max<int64_t>(0, 2 * oy - 1), iy1 = std::min<int64_t>(hy, 2 * oy + 2);
    for (int64_t ox = 0; ox < g.w; ++ox) {  // the pooled row, channels-last: row[ox * c + ch]
      const int64_t ix0 = std::max<int64_t>(0, 2 * ox - 1), ix1 = std::min<int64_t>(wy, 2 * ox + 2);
      max_taps(y, wy, c, iy0, iy1, ix0, ix1, row + ox * c);
    }
    for (int64_t ch = 0; ch < c; ++ch)
      sums[oy * c + ch] = relu_copy(planes + ch * g.cstride + g.toff[4] + oy * g.w, row + ch, c, g.w);
  }
}

void gconv(const GConvArgs& a) {
  switch (isa()) {
    case GConvIsa::kAvx512: return gconv_avx512(a);
    case GConvIsa::kAvx2: return gconv_avx2(a);
    default: TORCH_CHECK(false, "manidp: gconv needs a CPU with AVX-512F or AVX2 + FMA (and MANIDP_GCONV_ISA not off)");
  }
}

void gconv_team(const GConvArgs& a, ChunkCounter* states, int64_t team, int64_t rank, float* pooled) {
  switch (isa()) {
    case GConvIsa::kAvx512: return gconv_team_avx512(a, states, team, rank, pooled);
    case GConvIsa::kAvx2: return gconv_team_avx2(a, states, team, rank, pooled);
    default: TORCH_CHECK(false, "manidp: gconv needs a CPU with AVX-512F or AVX2 + FMA (and MANIDP_GCONV_ISA not off)");
  }
}

int64_t gconv_tiles(const GConvArgs& a) {
  switch (isa()) {
    case GConvIsa::kAvx512: return gconv_tiles_avx512(a);
    case GConvIsa::kAvx2: return gconv_tiles_avx2(a);
    default: TORCH_CHECK(false, "manidp: gconv needs a CPU with AVX-512F or AVX2 + FMA (and MANIDP_GCONV_ISA not off)");
  }
}

}  // namespace detail
}  // namespace manidp
