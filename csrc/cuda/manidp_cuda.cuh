// Shared declarations of the CUDA ops of manidp (DESIGN 3.3).
//
// Ops (schemas in registration_cuda.cu; semantics identical to the Triton ops,
// documented in manidp/deploy/gpu_common.py):
//   manidp::cuda_gate        pooling (from per-tile channel sums) + fc1 + relu + fc2 + bias + relu +
//                            clamp + threshold + compaction, one thread block per instance.
//   manidp::cuda_gated_conv  gathered implicit-GEMM conv with the fused epilogues
//                            (mode 0 plain + bias, 1 conv1 compact, 2 conv2 residual), a
//                            SIMT fp32-FMA kernel for every dtype and a WMMA tensor-core kernel
//                            for fp16/bf16 (fp32 accumulation).
// Nothing is copied back to the host: grids are sized for the full channel count and
// blocks past an instance's active count skip the reduction, so the ops can be captured in
// CUDA graphs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

namespace manidp {
namespace cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate(const at::Tensor& part, int64_t hw, const at::Tensor& fc1,
                                                    const at::Tensor& fc2, const at::Tensor& fc2_bias,
                                                    const at::Tensor& threshold, double clamp_max);

std::tuple<at::Tensor, at::Tensor> gated_conv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                                              const c10::optional<at::Tensor>& in_idx,
                                              const c10::optional<at::Tensor>& in_cnt,
                                              const c10::optional<at::Tensor>& out_idx,
                                              const c10::optional<at::Tensor>& out_cnt,
                                              const c10::optional<at::Tensor>& gate,
                                              const c10::optional<at::Tensor>& res, int64_t stride, int64_t ksize,
                                              int64_t mode, int64_t block_m, bool write_part, bool tf32,
                                              int64_t impl);

// Conv kernel selection (the op's `impl` argument).
enum ConvImpl : int64_t { kAuto = 0, kSimt = 1, kWmma = 2 };

}  // namespace cuda
}  // namespace manidp
