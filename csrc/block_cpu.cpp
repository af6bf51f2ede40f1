// CPU kernel of manidp::gated_block: the gated basic block of docs/DESIGN.md 3.2 (gates, compact
// convs, fused epilogues; docs/DESIGN.md 7.6).
//
// Three strategies compute the same result (the op's `mode`, BlockMode in manidp_common.h):
//  * per instance with gconv (the default where the CPU has AVX-512 or AVX2): each instance's convs
//    run on its active channels only, reading weight rows/columns in place (gconv_cpu.cpp),
//    with the gate scale, bias, ReLU, pooling and residual add fused into the epilogues.
//  * per instance with the library conv: the instance gathers the weight rows (and, for conv2,
//    the input-channel slices) it needs, scaled by its gate values, and at::conv2d (oneDNN)
//    runs on compact tensors.
//  * union: the batch runs one library conv over the union of its instances' active channels
//    and the epilogue applies each instance's mask; pays only when the sets overlap a lot.
// At batch 1 the work inside an instance uses every thread; at larger batch instances run in
// parallel, each single-threaded.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "manidp_cpu.h"

namespace manidp {
namespace {

constexpr int64_t kTaps = 9;  // 3x3 kernels

// Everything one block call needs, as raw pointers into contiguous fp32 tensors.
struct Block {
  int64_t n, cin, c, h, w, ho, wo, stride, mode;
  at::Tensor x, w1, b1, w2, b2;  // contiguous
  detail::GateParams gate1, gate2;
  int64_t hw_in() const { return h * w; }
  int64_t hw() const { return ho * wo; }
};

// Per-call results shared by the phases.
struct State {
  at::Tensor idx1, cnt1, idx2, cnt2;  // (N, C) / (N,) int32; the counts are returned
  std::vector<float> g1, g2;          // (N, C) gate values
  std::vector<float> pooled2;         // (N, C) pooled conv1 output, zeros off the active set
  at::Tensor out;                     // (N, C, Ho, Wo), holds the shortcut until the epilogue
  at::Tensor residual;                // what the epilogue adds b to (out itself or x)
};

// ------------------------------------------------------------------ small kernels

// Row gather of a (rows_total, len) matrix: dst[k] = scale[k] * src[rows[k]] (scale may be null).
void gather_rows(float* dst, const float* src, int64_t len, const int32_t* rows, int64_t k, const float* scale) {
  at::parallel_for(0, k, std::max<int64_t>(1, 32768 / std::max<int64_t>(len, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) detail::scale_copy(dst + i * len, src + rows[i] * len, scale ? scale[i] : 1.f, len);
  });
}

// conv2 weight gather: dst (k2, k1, 9) = scale[r] * w2[rows[r], cols[j], :] for a (C, C, 3, 3) w2.
// Each source row is contiguous, so this streams through the rows picking 36-byte chunks.
void gather_rows_cols(float* dst, const float* w2, int64_t cin, const int32_t* rows, int64_t k2, const float* scale,
                      const int32_t* cols, int64_t k1) {
  at::parallel_for(0, k2, std::max<int64_t>(1, 4096 / std::max<int64_t>(k1 * kTaps, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* src = w2 + rows[r] * cin * kTaps;
      float* d = dst + r * k1 * kTaps;
      const float s = scale ? scale[r] : 1.f;
      for (int64_t j = 0; j < k1; ++j) {
        const float* cs = src + cols[j] * kTaps;
        for (int t = 0; t < kTaps; ++t) d[j * kTaps + t] = s * cs[t];
      }
    }
  });
}

// In place a = relu(scale[j] * a) per channel j of a (k, hw) map, and pooled[j] = mean(a[j]).
// `scale` may be null (gate already folded into the weights).
void relu_scale_pool(float* a, int64_t k, int64_t hw, const float* scale, float* pooled) {
  at::parallel_for(0, k, std::max<int64_t>(1, 16384 / std::max<int64_t>(hw, 1)), [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      float* p = a + j * hw;
      const float s = scale ? scale[j] : 1.f;
      float acc = 0.f;
      for (int64_t i = 0; i < hw; ++i) {
        const float v = s * p[i];
        p[i] = v < 0.f ? 0.f : v;
        acc += p[i];
      }
      pooled[j] = acc / static_cast<float>(hw);
    }
  });
}

// out[c] = relu(res[c] + scale[c] * b[pos[c]]) where pos[c] >= 0, relu(res[c]) elsewhere, for one
// instance's (C, hw) maps.  `b` may be null when every addend is a constant: then add_const[c].
// With inactive_only, channels with pos[c] >= 0 are left alone (already written).
void residual_epilogue(float* out, const float* res, int64_t c, int64_t hw, const float* b, const int32_t* pos,
                       const float* scale, const float* add_const, bool inactive_only) {
  at::parallel_for(0, c, std::max<int64_t>(1, 16384 / std::max<int64_t>(hw, 1)), [&](int64_t cb, int64_t ce) {
    for (int64_t ch = cb; ch < ce; ++ch) {
      float* o = out + ch * hw;
      const float* r = res + ch * hw;
      const int32_t k = pos[ch];
      if (k < 0) {
        for (int64_t i = 0; i < hw; ++i) o[i] = r[i] < 0.f ? 0.f : r[i];
      } else if (inactive_only) {
        continue;
      } else if (b == nullptr) {
        const float add = add_const[ch];
        for (int64_t i = 0; i < hw; ++i) { const float v = r[i] + add; o[i] = v < 0.f ? 0.f : v; }
      } else {
        const float s = scale ? scale[ch] : 1.f;
        const float* bk = b + k * hw;
        for (int64_t i = 0; i < hw; ++i) { const float v = r[i] + s * bk[i]; o[i] = v < 0.f ? 0.f : v; }
      }
    }
  });
}

float channel_mean(const float* p, int64_t hw) { return detail::sum(p, hw) / static_cast<float>(hw); }

at::Tensor conv3x3(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias, int64_t stride) {
  return at::conv2d(input, weight, bias, {stride, stride}, {1, 1}).contiguous();
}

// ------------------------------------------------------------------ per-instance strategy

// Whether instance convs use gconv (weights read in place) rather than gathering weights for
// the library conv.  gconv needs AVX-512 or AVX2 and stride 1 or 2 (all ResNets use).
bool use_gconv(const Block& B) {
  return B.mode != kBlockLibrary && detail::gconv_available() && (B.stride == 1 || B.stride == 2);
}

// Gate values and bias entries of the active channels `idx[0:k]`.
void take(const float* src, const int32_t* idx, int32_t k, float* dst) {
  for (int32_t j = 0; j < k; ++j) dst[j] = src[idx[j]];
}

// Gate 2 of instance n from its pooled conv1 output; fills S.g2/idx2/cnt2 and returns the count.
int32_t instance_gate2(const Block& B, State& S, int64_t n) {
  std::vector<float> hidden(B.gate2.hidden);
  const int32_t k2 = detail::gate_one(B.gate2, S.pooled2.data() + n * B.c, S.g2.data() + n * B.c,
                                      S.idx2.data_ptr<int32_t>() + n * B.c, hidden.data());
  S.cnt2.data_ptr<int32_t>()[n] = k2;
  return k2;
}

// out[c] = relu(res[c] + g2[c] * b2[c]) for active c, relu(res[c]) elsewhere: conv2 with no input channel.
void bias_only_conv2(const Block& B, const int32_t* a2, int32_t k2, const float* s2, const int32_t* pos, float* out_n,
                     const float* res_n) {
  std::vector<float> add_const(B.c, 0.f);
  for (int32_t k = 0; k < k2; ++k) add_const[a2[k]] = s2[k] * B.b2.data_ptr<float>()[a2[k]];
  residual_epilogue(out_n, res_n, B.c, B.hw(), nullptr, pos, nullptr, add_const.data(), false);
}

// What conv2 of instance n needs once gate 2 has run: the active list a2[0:k2], each channel's
// position in it (pos, -1 when inactive), the active gate values s2, and the instance's output
// and residual maps.  done: conv2 was its bias alone and has been computed.
struct Conv2Plan {
  bool done = false;
  int32_t k2 = 0;
  const int32_t* a2 = nullptr;
  std::vector<int32_t> pos;
  std::vector<float> s2;
  float* out = nullptr;
  const float* res = nullptr;
};

// Gate 2 of instance n and its Conv2Plan.  With no input channel (k1 == 0) or no output channel,
// conv2 is its bias alone: that epilogue runs here and the plan is done.
Conv2Plan plan_conv2(const Block& B, State& S, int64_t n, int32_t k1) {
  Conv2Plan P;
  P.k2 = instance_gate2(B, S, n);
  P.a2 = S.idx2.data_ptr<int32_t>() + n * B.c;
  P.pos.assign(B.c, -1);
  for (int32_t k = 0; k < P.k2; ++k) P.pos[P.a2[k]] = k;
  P.s2.resize(P.k2);
  take(S.g2.data() + n * B.c, P.a2, P.k2, P.s2.data());
  P.out = S.out.data_ptr<float>() + n * B.c * B.hw();
  P.res = S.residual.data_ptr<float>() + n * B.c * B.hw();
  P.done = k1 == 0 || P.k2 == 0;
  if (P.done) bias_only_conv2(B, P.a2, P.k2, P.s2.data(), P.pos.data(), P.out, P.res);
  return P;
}

// Instance n with gconv: x is packed into padded planes, conv1 writes relu(g1 * (W1[A1] x + b1))
// straight into conv2's padded input planes and pools it, gate 2 runs, conv2 adds
// g2 * (W2[A2, A1] a + b2) to the residual in the block output.
void run_instance_gconv(const Block& B, State& S, int64_t n) {
  const int32_t k1 = S.cnt1.data_ptr<int32_t>()[n];
  const int32_t* a1 = S.idx1.data_ptr<int32_t>() + n * B.c;
  float* pooled2 = S.pooled2.data() + n * B.c;
  const detail::PlaneGeometry g1 = detail::plane_geometry(B.h, B.w, B.stride);
  const detail::PlaneGeometry g2 = detail::plane_geometry(B.ho, B.wo, 1);
  // Plane buffers are reused across calls: fresh multi-MB allocations would cost page faults.
  thread_local std::vector<float> xbuf, abuf;
  if (k1 > 0) {
    std::vector<float> s1(k1), bias(k1), pooled(k1);
    if (xbuf.size() < static_cast<size_t>(B.cin * g1.cstride)) xbuf.resize(B.cin * g1.cstride);
    detail::pack_planes(g1, B.x.data_ptr<float>() + n * B.cin * B.hw_in(), B.cin, xbuf.data());
    take(S.g1.data() + n * B.c, a1, k1, s1.data());
    take(B.b1.data_ptr<float>(), a1, k1, bias.data());
    if (abuf.size() < static_cast<size_t>(k1 * g2.cstride)) abuf.resize(k1 * g2.cstride);
    std::fill(abuf.begin(), abuf.begin() + k1 * g2.cstride, 0.f);  // zero borders are conv2's padding
    detail::GConvArgs c;
    c.in = xbuf.data(); c.geom = g1; c.nch = B.cin;
    c.weight = B.w1.data_ptr<float>(); c.ldw = B.cin * kTaps; c.rows = a1; c.m = k1;
    c.bias = bias.data(); c.scale = s1.data();
    c.out = abuf.data(); c.out_chan_stride = g2.cstride; c.out_offset = g2.toff[4];  // tap (1, 1) = the pixel itself
    c.pooled = pooled.data();
    detail::gconv(c);
    for (int32_t j = 0; j < k1; ++j) pooled2[a1[j]] = pooled[j];
  }
  const Conv2Plan P = plan_conv2(B, S, n, k1);
  if (P.done) return;
  std::vector<float> bias2(P.k2);
  take(B.b2.data_ptr<float>(), P.a2, P.k2, bias2.data());
  detail::GConvArgs c;
  c.in = abuf.data(); c.geom = g2; c.nch = k1;
  c.weight = B.w2.data_ptr<float>(); c.ldw = B.c * kTaps; c.rows = P.a2; c.cols = a1; c.m = P.k2;
  c.bias = bias2.data(); c.scale = P.s2.data();
  c.out = P.out; c.residual = P.res; c.out_chans = P.a2;
  c.out_chan_stride = B.hw(); c.out_offset = 0;
  detail::gconv(c);
  residual_epilogue(P.out, P.res, B.c, B.hw(), nullptr, P.pos.data(), nullptr, nullptr, /*inactive_only=*/true);
}

// Instance n with the library conv: weights of the active channels are gathered (gate values
// folded in: relu(g (W x + b)) == relu((g W) x + g b) as g > 0) and at::conv2d runs on
// compact tensors.
void run_instance_library(const Block& B, State& S, int64_t n) {
  const auto fopt = B.x.options();
  const int32_t k1 = S.cnt1.data_ptr<int32_t>()[n];
  const int32_t* a1 = S.idx1.data_ptr<int32_t>() + n * B.c;
  float* pooled2 = S.pooled2.data() + n * B.c;
  std::vector<float> s1(k1);
  take(S.g1.data() + n * B.c, a1, k1, s1.data());
  at::Tensor a;
  if (k1 > 0) {
    at::Tensor wc = at::empty({k1, B.cin, 3, 3}, fopt), bc = at::empty({k1}, fopt);
    gather_rows(wc.data_ptr<float>(), B.w1.data_ptr<float>(), B.cin * kTaps, a1, k1, s1.data());
    gather_rows(bc.data_ptr<float>(), B.b1.data_ptr<float>(), 1, a1, k1, s1.data());
    a = conv3x3(B.x.narrow(0, n, 1), wc, bc, B.stride);
    std::vector<float> pooled(k1);
    relu_scale_pool(a.data_ptr<float>(), k1, B.hw(), nullptr, pooled.data());
    for (int32_t j = 0; j < k1; ++j) pooled2[a1[j]] = pooled[j];
  }
  const Conv2Plan P = plan_conv2(B, S, n, k1);
  if (P.done) return;
  at::Tensor wc = at::empty({P.k2, k1, 3, 3}, fopt), bc = at::empty({P.k2}, fopt);
  gather_rows_cols(wc.data_ptr<float>(), B.w2.data_ptr<float>(), B.c, P.a2, P.k2, P.s2.data(), a1, k1);
  gather_rows(bc.data_ptr<float>(), B.b2.data_ptr<float>(), 1, P.a2, P.k2, P.s2.data());
  at::Tensor b = conv3x3(a, wc, bc, 1);
  residual_epilogue(P.out, P.res, B.c, B.hw(), b.data_ptr<float>(), P.pos.data(), nullptr, nullptr, false);
}

void run_instance(const Block& B, State& S, int64_t n) {
  if (use_gconv(B))
    run_instance_gconv(B, S, n);
  else
    run_instance_library(B, S, n);
}

void run_per_instance(const Block& B, State& S) {
  if (B.n == 1) {
    run_instance(B, S, 0);  // the convs and gathers inside use every thread
    return;
  }
  // Nested at::parallel_for calls (and oneDNN inside an OpenMP region) run single-threaded.
  at::parallel_for(0, B.n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) run_instance(B, S, i);
  });
}

// ------------------------------------------------------------------ union strategy

// Sorted union of the first cnt[n] entries of every row of idx (N, C).
std::vector<int32_t> active_union(const at::Tensor& idx, const at::Tensor& cnt, int64_t c) {
  std::vector<char> any(c, 0);
  const int32_t* ip = idx.data_ptr<int32_t>();
  const int32_t* cp = cnt.data_ptr<int32_t>();
  for (int64_t n = 0; n < idx.size(0); ++n)
    for (int32_t j = 0; j < cp[n]; ++j) any[ip[n * c + j]] = 1;
  std::vector<int32_t> u;
  for (int64_t ch = 0; ch < c; ++ch)
    if (any[ch]) u.push_back(static_cast<int32_t>(ch));
  return u;
}

// Per-instance mask scale of the union channels: g where active, 0 elsewhere.  (N, |u|)
std::vector<float> union_scales(const std::vector<float>& g, const at::Tensor& idx, const at::Tensor& cnt,
                                const std::vector<int32_t>& u, int64_t c) {
  const int64_t n = idx.size(0), k = static_cast<int64_t>(u.size());
  std::vector<int32_t> pos(c, -1);
  for (int64_t j = 0; j < k; ++j) pos[u[j]] = static_cast<int32_t>(j);
  std::vector<float> s(n * k, 0.f);
  const float* gp = g.data();
  const int32_t* ip = idx.data_ptr<int32_t>();
  const int32_t* cp = cnt.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    for (int32_t j = 0; j < cp[i]; ++j) s[i * k + pos[ip[i * c + j]]] = gp[i * c + ip[i * c + j]];
  return s;
}

void run_union(const Block& B, State& S) {
  const auto fopt = B.x.options();
  const std::vector<int32_t> u1 = active_union(S.idx1, S.cnt1, B.c);
  const int64_t k1 = static_cast<int64_t>(u1.size());
  at::Tensor a;
  if (k1 > 0) {
    at::Tensor wc = at::empty({k1, B.cin, 3, 3}, fopt), bc = at::empty({k1}, fopt);
    gather_rows(wc.data_ptr<float>(), B.w1.data_ptr<float>(), B.cin * kTaps, u1.data(), k1, nullptr);
    gather_rows(bc.data_ptr<float>(), B.b1.data_ptr<float>(), 1, u1.data(), k1, nullptr);
    a = conv3x3(B.x, wc, bc, B.stride);  // (N, k1, Ho, Wo), every thread
    const std::vector<float> s1 = union_scales(S.g1, S.idx1, S.cnt1, u1, B.c);
    std::vector<float> pooled(B.n * k1);
    // relu(s * y) == s * relu(y) for s >= 0; s = 0 zeroes the channels this instance does not use.
    relu_scale_pool(a.data_ptr<float>(), B.n * k1, B.hw(), s1.data(), pooled.data());
    float* p2 = S.pooled2.data();
    for (int64_t i = 0; i < B.n; ++i)
      for (int64_t j = 0; j < k1; ++j) p2[i * B.c + u1[j]] = pooled[i * k1 + j];
  }
  at::parallel_for(0, B.n, 16, [&](int64_t b, int64_t e) {
    std::vector<float> hidden(B.gate2.hidden);
    for (int64_t i = b; i < e; ++i)
      S.cnt2.data_ptr<int32_t>()[i] =
          detail::gate_one(B.gate2, S.pooled2.data() + i * B.c, S.g2.data() + i * B.c,
                           S.idx2.data_ptr<int32_t>() + i * B.c, hidden.data());
  });
  const std::vector<int32_t> u2 = active_union(S.idx2, S.cnt2, B.c);
  const int64_t k2 = static_cast<int64_t>(u2.size());
  const std::vector<float> s2u = union_scales(S.g2, S.idx2, S.cnt2, u2, B.c);
  std::vector<int32_t> pos(B.c, -1);
  for (int64_t k = 0; k < k2; ++k) pos[u2[k]] = static_cast<int32_t>(k);
  at::Tensor b;
  if (k2 > 0 && k1 > 0) {
    at::Tensor wc = at::empty({k2, k1, 3, 3}, fopt), bc = at::empty({k2}, fopt);
    gather_rows_cols(wc.data_ptr<float>(), B.w2.data_ptr<float>(), B.c, u2.data(), k2, nullptr, u1.data(), k1);
    gather_rows(bc.data_ptr<float>(), B.b2.data_ptr<float>(), 1, u2.data(), k2, nullptr);
    b = conv3x3(a, wc, bc, 1);  // (N, k2, Ho, Wo)
  }
  const float* b2 = B.b2.data_ptr<float>();
  for (int64_t i = 0; i < B.n; ++i) {
    // Scale per output channel of instance i (0 where inactive: adds nothing).
    std::vector<float> scale(B.c, 0.f), add_const(B.c, 0.f);
    for (int64_t k = 0; k < k2; ++k) {
      scale[u2[k]] = s2u[i * k2 + k];
      add_const[u2[k]] = s2u[i * k2 + k] * b2[u2[k]];
    }
    float* out_i = S.out.data_ptr<float>() + i * B.c * B.hw();
    const float* res_i = S.residual.data_ptr<float>() + i * B.c * B.hw();
    if (b.defined())
      residual_epilogue(out_i, res_i, B.c, B.hw(), b.data_ptr<float>() + i * k2 * B.hw(), pos.data(),
                        scale.data(), nullptr, false);
    else
      residual_epilogue(out_i, res_i, B.c, B.hw(), nullptr, pos.data(), nullptr, add_const.data(), false);
  }
}

// Union pays when the batch's active sets overlap enough that its extra MACs cost less than
// the efficiency lost by per-instance library convs (small GEMMs, one weight gather per
// instance).  gconv instance convs do no gathers and run near peak at any batch, so with gconv
// the union never pays (benchmarks/results/cpu_design_notes.md).
bool choose_union(const Block& B, const State& S) {
  if (B.n == 1 || use_gconv(B)) return false;
  const std::vector<int32_t> u1 = active_union(S.idx1, S.cnt1, B.c);
  double inst = 0;
  const int32_t* cp = S.cnt1.data_ptr<int32_t>();
  for (int64_t i = 0; i < B.n; ++i) inst += cp[i];
  const double uni = static_cast<double>(B.n) * static_cast<double>(u1.size());
  return uni <= 1.5 * inst;
}


// Checks the op's arguments and collects the block's sizes and contiguous tensors.
Block make_block(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                 const at::Tensor& b2, const c10::optional<at::Tensor>& ws, const c10::optional<at::Tensor>& bs,
                 int64_t stride, int64_t mode) {
  using detail::check_tensor;
  const char* op = "gated_block";
  check_tensor(op, "x", x, {-1, -1, -1, -1}, "(N, Cin, H, W)");
  TORCH_CHECK(stride >= 1, "manidp::gated_block: stride must be >= 1; got ", stride);
  TORCH_CHECK(mode == kBlockAuto || mode == kBlockInstance || mode == kBlockUnion || mode == kBlockLibrary,
              "manidp::gated_block: mode must be ", static_cast<int64_t>(kBlockAuto), " (auto), ",
              static_cast<int64_t>(kBlockInstance), " (per instance), ", static_cast<int64_t>(kBlockUnion),
              " (union) or ", static_cast<int64_t>(kBlockLibrary), " (per instance, library conv); got ", mode);
  Block B;
  B.n = x.size(0);
  B.cin = x.size(1);
  B.h = x.size(2);
  B.w = x.size(3);
  B.stride = stride;
  B.mode = mode;
  TORCH_CHECK(B.n >= 1 && B.h >= 1 && B.w >= 1, "manidp::gated_block: x must be non-empty; got shape ", x.sizes());
  check_tensor(op, "w1", w1, {-1, B.cin, 3, 3}, "(C, Cin, 3, 3)");
  B.c = w1.size(0);
  check_tensor(op, "b1", b1, {B.c}, "(C,)");
  check_tensor(op, "w2", w2, {B.c, B.c, 3, 3}, "(C, C, 3, 3)");
  check_tensor(op, "b2", b2, {B.c}, "(C,)");
  B.ho = conv_out_size(B.h, 3, stride, 1);
  B.wo = conv_out_size(B.w, 3, stride, 1);
  TORCH_CHECK(ws.has_value() == bs.has_value(), "manidp::gated_block: ws and bs must be given together");
  if (ws.has_value()) {
    check_tensor(op, "ws", *ws, {B.c, B.cin, 1, 1}, "(C, Cin, 1, 1)");
    check_tensor(op, "bs", *bs, {B.c}, "(C,)");
  } else {
    TORCH_CHECK(stride == 1 && B.cin == B.c, "manidp::gated_block: without a shortcut conv (ws) the block needs "
                "stride 1 and Cin == C; got stride ", stride, ", Cin ", B.cin, ", C ", B.c);
  }
  B.x = x.contiguous();
  B.w1 = w1.contiguous();
  B.b1 = b1.contiguous();
  B.w2 = w2.contiguous();
  B.b2 = b2.contiguous();
  return B;
}

// Gate 1 of every instance from its pooled input: S.g1, S.idx1, S.cnt1.
void run_gate1(const Block& B, State& S) {
  const auto iopt = B.x.options().dtype(at::kInt);
  // Internal per-call arrays are plain vectors: a tensor allocation goes through the dispatcher,
  // which adds up over the many small blocks of a CIFAR ResNet.
  std::vector<float> pooled(B.n * B.cin);
  const float* xp = B.x.data_ptr<float>();
  at::parallel_for(0, B.n * B.cin, std::max<int64_t>(1, 16384 / B.hw_in()), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) pooled[i] = channel_mean(xp + i * B.hw_in(), B.hw_in());
  });
  S.g1.resize(B.n * B.c);
  S.idx1 = at::empty({B.n, B.c}, iopt);
  S.cnt1 = at::empty({B.n}, iopt);
  at::parallel_for(0, B.n, 16, [&](int64_t b, int64_t e) {
    std::vector<float> hidden(B.gate1.hidden);
    for (int64_t i = b; i < e; ++i)
      S.cnt1.data_ptr<int32_t>()[i] = detail::gate_one(B.gate1, pooled.data() + i * B.cin, S.g1.data() + i * B.c,
                                                       S.idx1.data_ptr<int32_t>() + i * B.c, hidden.data());
  });
}

// The block output initialised with the shortcut: the dense (never gated) 1x1 conv in place,
// or, for the identity, an empty output whose epilogue reads x.
void init_output(const Block& B, State& S, const c10::optional<at::Tensor>& ws, const c10::optional<at::Tensor>& bs) {
  if (ws.has_value()) {
    S.out = at::conv2d(B.x, ws->contiguous(), bs->contiguous(), {B.stride, B.stride}).contiguous();
    S.residual = S.out;
  } else {
    S.out = at::empty({B.n, B.c, B.ho, B.wo}, B.x.options());
    S.residual = B.x;
  }
}

}  // namespace

Tensor3 gated_block_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                        const at::Tensor& b2, const c10::optional<at::Tensor>& ws,
                        const c10::optional<at::Tensor>& bs, const at::Tensor& g1_fc1, const at::Tensor& g1_fc2,
                        const at::Tensor& g1_bias, const at::Tensor& g1_threshold, const at::Tensor& g2_fc1,
                        const at::Tensor& g2_fc2, const at::Tensor& g2_bias, const at::Tensor& g2_threshold,
                        double clamp_max, int64_t stride, int64_t mode) {
  Block B = make_block(x, w1, b1, w2, b2, ws, bs, stride, mode);
  // Contiguous gate tensors stay alive in these locals while the raw views are used.
  const at::Tensor f11 = g1_fc1.contiguous(), f12 = g1_fc2.contiguous(), gb1 = g1_bias.contiguous();
  const at::Tensor f21 = g2_fc1.contiguous(), f22 = g2_fc2.contiguous(), gb2 = g2_bias.contiguous();
  B.gate1 = detail::gate_params("gated_block", "gate1", f11, f12, gb1, g1_threshold, clamp_max, B.cin, B.c);
  B.gate2 = detail::gate_params("gated_block", "gate2", f21, f22, gb2, g2_threshold, clamp_max, B.c, B.c);

  State S;
  run_gate1(B, S);
  const auto iopt = B.x.options().dtype(at::kInt);
  S.g2.resize(B.n * B.c);
  S.idx2 = at::empty({B.n, B.c}, iopt);
  S.cnt2 = at::empty({B.n}, iopt);
  S.pooled2.assign(B.n * B.c, 0.f);
  init_output(B, S, ws, bs);
  if (mode == kBlockUnion || (mode == kBlockAuto && choose_union(B, S)))
    run_union(B, S);
  else
    run_per_instance(B, S);
  return {S.out, S.cnt1, S.cnt2};
}

}  // namespace manidp
