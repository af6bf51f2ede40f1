// CPU gate (docs/DESIGN.md 1.1, 7.6): pooled input -> gate values -> active channel list.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "manidp_cpu.h"

namespace manidp {
namespace detail {

MANIDP_MULTIVERSION float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y = W x for a row-major (rows, cols) W: one multiversioned call per layer, not per row.
MANIDP_MULTIVERSION void matvec(const float* w, const float* x, int64_t rows, int64_t cols, float* y) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* wr = w + r * cols;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < cols; ++i) s += wr[i] * x[i];
    y[r] = s;
  }
}

// Columns whose x is exactly zero add nothing (the weights are finite: the engine rejects others),
// so their weights are never read.  A gate's inputs are often zero: gate 2 pools conv1's output,
// whose closed channels are zero, and fc2 reads fc1's rectified output.  On the late layers
// of ImageNet networks the gates' weights do not stay in L2, so skipped columns are skipped
// memory traffic on every rank's critical path (docs/DESIGN.md 7.7).
MANIDP_MULTIVERSION void matvec_t(const float* wt, const float* x, int64_t rows, int64_t cols, float* y) {
  constexpr int64_t kChunk = 64;   // outputs accumulated at once: four AVX-512 registers
  constexpr int64_t kCols = 256;   // columns whose nonzero ids are listed at once
  int32_t nz[kCols];
  std::fill(y, y + rows, 0.f);
  for (int64_t c0 = 0; c0 < cols; c0 += kCols) {
    int64_t nnz = 0;
    // Without a branch: which inputs are zero changes from call to call, and a mispredicted
    // branch per column would cost more than a small layer's products.
    for (int64_t i = c0; i < std::min(c0 + kCols, cols); ++i) {
      nz[nnz] = static_cast<int32_t>(i);
      nnz += x[i] != 0.f;  // NaN != 0: kept, and propagates
    }
    if (nnz == 0) continue;
    for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
      const int64_t n = std::min(kChunk, rows - r0);
      float acc[kChunk];
      std::copy(y + r0, y + r0 + n, acc);
      int64_t k = 0;
      // Four columns per pass: the accumulators (which the compiler may keep in memory) are read
      // and written once per four FMAs, not once per FMA.
      for (; k + 4 <= nnz; k += 4) {
        const int64_t i0 = nz[k], i1 = nz[k + 1], i2 = nz[k + 2], i3 = nz[k + 3];
        const float x0 = x[i0], x1 = x[i1], x2 = x[i2], x3 = x[i3];
        const float *w0 = wt + i0 * rows + r0, *w1 = wt + i1 * rows + r0;
        const float *w2 = wt + i2 * rows + r0, *w3 = wt + i3 * rows + r0;
#pragma omp simd
        for (int64_t r = 0; r < n; ++r) acc[r] += (w0[r] * x0 + w1[r] * x1) + (w2[r] * x2 + w3[r] * x3);
      }
      for (; k < nnz; ++k) {
        const float xi = x[nz[k]];
        const float* w = wt + nz[k] * rows + r0;
#pragma omp simd
        for (int64_t r = 0; r < n; ++r) acc[r] += w[r] * xi;
      }
      std::copy(acc, acc + n, y + r0);
    }
  }
}

MANIDP_MULTIVERSION float sum(const float* a, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i];
  return s;
}

MANIDP_MULTIVERSION void max_taps(const float* y, int64_t wy, int64_t c, int64_t iy0, int64_t iy1, int64_t ix0,
                                  int64_t ix1, float* out) {
  const float* first = y + (iy0 * wy + ix0) * c;
#pragma omp simd
  for (int64_t ch = 0; ch < c; ++ch) out[ch] = first[ch];
  for (int64_t iy = iy0; iy < iy1; ++iy)
    for (int64_t ix = ix0; ix < ix1; ++ix) {
      const float* v = y + (iy * wy + ix) * c;
#pragma omp simd
      for (int64_t ch = 0; ch < c; ++ch) out[ch] = (out[ch] >= v[ch] || out[ch] != out[ch]) ? out[ch] : v[ch];
    }
}

MANIDP_MULTIVERSION float relu_copy(float* dst, const float* src, int64_t src_stride, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float v = src[i * src_stride] < 0.f ? 0.f : src[i * src_stride];  // NaN passes through, as torch.relu
    dst[i] = v;
    s += v;
  }
  return s;
}

MANIDP_MULTIVERSION void scale_copy(float* dst, const float* src, float s, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = s * src[i];
}

static std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << (s.size() == 1 ? ",)" : ")");
  return o.str();
}

void check_tensor(const char* op, const char* name, const at::Tensor& t, const std::vector<int64_t>& shape,
                  const char* shape_doc) {
  TORCH_CHECK(t.device().is_cpu(), "manidp::", op, ": ", name, " must be a CPU tensor; got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "manidp::", op, ": ", name, " must be float32; got ",
              t.scalar_type());
  bool ok = t.dim() == static_cast<int64_t>(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || t.size(i) == shape[i];
  if (!ok) {
    std::ostringstream want;
    want << "(";
    for (size_t i = 0; i < shape.size(); ++i) {
      want << (i ? ", " : "");
      if (shape[i] < 0) want << "*"; else want << shape[i];
    }
    want << (shape.size() == 1 ? ",)" : ")");
    TORCH_CHECK(false, "manidp::", op, ": ", name, " must have shape ", shape_doc, " = ", want.str(), "; got ",
                shape_str(t.sizes()));
  }
}

GateParams gate_params(const char* op, const char* name, const at::Tensor& fc1, const at::Tensor& fc2,
                       const at::Tensor& bias, const at::Tensor& threshold, double clamp_max, int64_t cin,
                       int64_t c) {
  std::string n(name);
  check_tensor(op, (n + " fc1").c_str(), fc1, {-1, cin}, "(hidden, Cin)");
  const int64_t hidden = fc1.size(0);
  TORCH_CHECK(hidden >= 1, "manidp::", op, ": ", name, " fc1 must have at least one row");
  check_tensor(op, (n + " fc2").c_str(), fc2, {c, hidden}, "(C, hidden)");
  check_tensor(op, (n + " fc2_bias").c_str(), bias, {c}, "(C,)");
  TORCH_CHECK(threshold.numel() == 1 && threshold.scalar_type() == at::kFloat && threshold.device().is_cpu(),
              "manidp::", op, ": ", name, " threshold must be a float32 CPU tensor with one element; got ",
              threshold.scalar_type(), " of shape ", shape_str(threshold.sizes()));
  TORCH_CHECK(fc1.is_contiguous() && fc2.is_contiguous() && bias.is_contiguous(), "manidp::", op, ": ", name,
              " tensors must be contiguous");
  return GateParams{fc1.data_ptr<float>(), fc2.data_ptr<float>(), bias.data_ptr<float>(),
                    *threshold.data_ptr<float>(), static_cast<float>(clamp_max), cin, hidden, c};  // not item(): no dispatch
}

// relu and clamp written so that NaN propagates as in torch (and then counts as inactive).
static inline float relu(float v) { return v < 0.f ? 0.f : v; }

int32_t gate_one(const GateParams& p, const float* pooled, float* g, int32_t* idx, float* hidden_buf) {
  if (p.fc1t)
    matvec_t(p.fc1t, pooled, p.hidden, p.cin, hidden_buf);
  else
    matvec(p.fc1, pooled, p.hidden, p.cin, hidden_buf);
  for (int64_t j = 0; j < p.hidden; ++j) hidden_buf[j] = relu(hidden_buf[j]);
  if (p.fc2t)
    matvec_t(p.fc2t, hidden_buf, p.c, p.hidden, g);
  else
    matvec(p.fc2, hidden_buf, p.c, p.hidden, g);
  int32_t cnt = 0;
  for (int64_t c = 0; c < p.c; ++c) {
    float v = relu(g[c] + p.bias[c]);
    v = v > p.clamp_max ? p.clamp_max : v;
    g[c] = v;
    if (v >= p.threshold && v > 0.f) idx[cnt++] = static_cast<int32_t>(c);
  }
  for (int64_t c = cnt; c < p.c; ++c) idx[c] = -1;
  return cnt;
}

}  // namespace detail

Tensor3 gate_compact_cpu(const at::Tensor& pooled, const at::Tensor& fc1, const at::Tensor& fc2,
                         const at::Tensor& fc2_bias, const at::Tensor& threshold, double clamp_max) {
  detail::check_tensor("gate_compact", "pooled", pooled, {-1, -1}, "(N, Cin)");
  const int64_t n = pooled.size(0), cin = pooled.size(1);
  TORCH_CHECK(fc2.dim() == 2, "manidp::gate_compact: fc2 must have shape (C, hidden); got ", fc2.dim(),
              " dimensions");
  const int64_t c = fc2.size(0);
  // Keep contiguous copies alive: the raw view below points into them.
  const at::Tensor fc1c = fc1.contiguous(), fc2c = fc2.contiguous(), biasc = fc2_bias.contiguous();
  const auto p = detail::gate_params("gate_compact", "gate", fc1c, fc2c, biasc, threshold, clamp_max, cin, c);
  const at::Tensor x = pooled.contiguous();
  at::Tensor g = at::empty({n, c}, pooled.options());
  at::Tensor idx = at::empty({n, c}, pooled.options().dtype(at::kInt));
  at::Tensor cnt = at::empty({n}, pooled.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  float* gp = g.data_ptr<float>();
  int32_t* ip = idx.data_ptr<int32_t>();
  int32_t* cp = cnt.data_ptr<int32_t>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> hidden(p.hidden);
    for (int64_t i = begin; i < end; ++i) cp[i] = detail::gate_one(p, xp + i * cin, gp + i * c, ip + i * c, hidden.data());
  });
  return {g, idx, cnt};
}

}  // namespace manidp
