// Shared declarations of the CPU kernels of the manidp ops (docs/DESIGN.md 7.6).
//
// The ops themselves are declared (schemas) in registration.cpp; this header
// lists the CPU kernels and the small helpers the kernel files share.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "manidp_common.h"

// Hot inner loops are compiled for several instruction sets and picked at load
// time (GCC ifunc): the extension is built without -march flags so the wheel runs
// anywhere, yet the loops below use AVX-512/AVX2 where the CPU has them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MANIDP_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MANIDP_MULTIVERSION
#endif

namespace manidp {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// ---------------------------------------------------------------- op kernels (CPU)
Tensor3 gate_compact_cpu(const at::Tensor& pooled, const at::Tensor& fc1, const at::Tensor& fc2,
                         const at::Tensor& fc2_bias, const at::Tensor& threshold, double clamp_max);

Tensor3 gated_block_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                        const at::Tensor& b2, const c10::optional<at::Tensor>& ws,
                        const c10::optional<at::Tensor>& bs, const at::Tensor& g1_fc1, const at::Tensor& g1_fc2,
                        const at::Tensor& g1_bias, const at::Tensor& g1_threshold, const at::Tensor& g2_fc1,
                        const at::Tensor& g2_fc2, const at::Tensor& g2_bias, const at::Tensor& g2_threshold,
                        double clamp_max, int64_t stride, int64_t mode);

// Registers torch.classes.manidp.CpuNetwork, the whole network in one call (network_cpu.cpp).
void register_cpu_network(torch::Library& m);

// ---------------------------------------------------------------- shared helpers
namespace detail {

// Raw view of one gate's fp32 parameters (all contiguous).
struct GateParams {
  const float* fc1;   // (hidden, cin)
  const float* fc2;   // (c, hidden)
  const float* bias;  // (c,)
  float threshold;
  float clamp_max;
  int64_t cin, hidden, c;
  // Optional transposed copies, (cin, hidden) and (hidden, c): with them the layers run as sums
  // of weight columns (matvec_t), without a horizontal reduction per output.
  const float* fc1t = nullptr;
  const float* fc2t = nullptr;
};

// Checks a gate's tensors against the expected input/output widths and returns a raw view.
// `op` and `name` prefix every error message.
GateParams gate_params(const char* op, const char* name, const at::Tensor& fc1, const at::Tensor& fc2,
                       const at::Tensor& bias, const at::Tensor& threshold, double clamp_max, int64_t cin,
                       int64_t c);

// One instance's gate: `g` (c) gate values, `idx` (c) active ids ascending then -1,
// returns the active count.  `hidden_buf` needs p.hidden floats.
int32_t gate_one(const GateParams& p, const float* pooled, float* g, int32_t* idx, float* hidden_buf);

// ---- gconv: one instance's gathered 3x3 conv (padding 1) reading weights in place (gconv_cpu.cpp)

// Layout of a conv input as row-padded planes (gconv_cpu.cpp): channel j, tap t (= ky * 3 + kx)
// of output pixel q (= oy * wo + ox) is buf[j * cstride + toff[t] + q], masked at the borders.
struct PlaneGeometry {
  int64_t h = 0, w = 0, stride = 1, ho = 0, wo = 0;
  int64_t psize = 0, cstride = 0;
  int64_t toff[9] = {};
};
PlaneGeometry plane_geometry(int64_t h, int64_t w, int64_t stride);  // stride 1 or 2
// relu(max_pool2d(y, 3, stride 2, padding 1)) for output rows [r0, r1) of every channel: y is
// one image's (hy, wy, c) channels-last map, g the stride-1 planes of the pooled map (g.h, g.w),
// written pixels only (the caller zeroes their borders).  Channel ch's sum over output row oy
// goes to sums[oy * c + ch].  `row` is scratch of c * g.w floats.  NaN propagates as in torch.
void pool_relu_pack(const float* y, int64_t hy, int64_t wy, int64_t c, const PlaneGeometry& g, int64_t r0, int64_t r1,
                    float* planes, float* sums, float* row);
// Fills buf (nch * cstride floats) from x (nch, h, w).
void pack_planes(const PlaneGeometry& g, const float* x, int64_t nch, float* buf);
// The same from maps whose channel j starts at x + j * x_cstride (each h * w floats, row-major).
void pack_planes(const PlaneGeometry& g, const float* x, int64_t x_cstride, int64_t nch, float* buf);

//   y[r, p] = scale[r] * (bias[r] + sum_{j, t} weight[rows[r] * ldw + col(j) * taps + t] * in(j, t, p))
// with col(j) = cols ? cols[j] : j, then out(r, p) = relu(y + residual(r, p)) (no residual:
// relu(y); relu only when `relu`) where out(r, p) is out[chan(r) * out_chan_stride + out_offset + p] for pixel
// p = oy * wo + ox, chan(r) = out_chans ? out_chans[r] : r, and residual is read at the same
// offsets.  With `pooled`, pooled[r] = mean over pixels of out(r, .).
struct GConvArgs {
  const float* in = nullptr;  // planes of geom, nch channels
  PlaneGeometry geom;
  int64_t nch = 0;
  const float* weight = nullptr;
  int64_t ldw = 0;
  const int32_t* rows = nullptr;
  const int32_t* cols = nullptr;
  int64_t m = 0;
  const float* bias = nullptr;   // (m,)
  const float* scale = nullptr;  // (m,) or null
  float* out = nullptr;
  const float* residual = nullptr;
  const int32_t* out_chans = nullptr;
  int64_t out_chan_stride = 0, out_offset = 0;
  float* pooled = nullptr;
  int taps = 9;       // 9: the 3x3 conv; 1: its centre tap alone, a 1x1 conv of the same stride
  bool relu = true;
};
// Whether a gconv kernel runs on this CPU (AVX-512F, or AVX2 + FMA; MANIDP_GCONV_ISA may
// narrow the choice), and its name: "avx512", "avx2" or "none".
bool gconv_available();
std::string gconv_isa_name();
void gconv(const GConvArgs& a);
// One rank's chunk counter of a conv run by a team (gconv_team), alone in its cache line: the
// ranks update theirs while the others update their own.
struct alignas(64) ChunkCounter {
  std::atomic<int64_t> taken{0};
};
// gconv(a) run by a team of `team` threads of the caller's own, each of which calls this with
// its rank and the same `states` (team counters, 0 before the first call): each rank computes
// the chunks of its own equal share, then takes the other ranks' last chunks while any are
// left.  Together they write every output once, and a faster thread does more.
// Pooled sums, not divided by the pixel count, go to pooled[tile * m + row] (gconv_tiles(a) x m
// floats, or null), whose sum over tiles in tile order is the same however the chunks were
// shared out; a.pooled is ignored.
void gconv_team(const GConvArgs& a, ChunkCounter* states, int64_t team, int64_t rank, float* pooled);
int64_t gconv_tiles(const GConvArgs& a);

// Vector helpers (multiversioned).
float dot(const float* a, const float* b, int64_t n);
void matvec(const float* w, const float* x, int64_t rows, int64_t cols, float* y);
// y = W x from W's transpose wt (cols, rows), row-major; the columns where x is zero are skipped
// (W finite).
void matvec_t(const float* wt, const float* x, int64_t rows, int64_t cols, float* y);
float sum(const float* a, int64_t n);
// out[ch] = max of y[(iy * wy + ix) * c + ch] over iy in [iy0, iy1), ix in [ix0, ix1) (NaN wins).
void max_taps(const float* y, int64_t wy, int64_t c, int64_t iy0, int64_t iy1, int64_t ix0, int64_t ix1, float* out);
// dst[i] = relu(src[i * src_stride]), i < n (NaN passes through); returns the sum of dst.
float relu_copy(float* dst, const float* src, int64_t src_stride, int64_t n);
void scale_copy(float* dst, const float* src, float s, int64_t n);

// TORCH_CHECK helper: `t` is a float32 CPU tensor with exactly `shape` (-1 = any).
void check_tensor(const char* op, const char* name, const at::Tensor& t, const std::vector<int64_t>& shape,
                  const char* shape_doc);

}  // namespace detail
}  // namespace manidp
