// Shared declarations of the CUDA kernels of the GPU ops (docs/DESIGN.md 7.5).
//
// Ops (schemas in csrc/registration.cpp, semantics in docs/DESIGN.md 7.2; the Triton kernels
// implement the same contract):
//   manidp::gpu_gate    pooling (from per-tile channel sums) + fc1 + relu + fc2 + bias + relu +
//                       clamp + threshold + compaction, one thread block per instance.
//   manidp::gated_conv  gathered implicit-GEMM conv with the fused epilogues (ConvMode), a SIMT
//                       fp32-FMA kernel for every dtype and a WMMA tensor-core kernel for
//                       fp16/bf16 (fp32 accumulation), chosen by `impl` (ConvImpl).
// Nothing is copied back to the host: grids are sized for the full channel count and
// blocks past an instance's active count skip the reduction, so the ops can be captured in
// CUDA graphs.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>

#include "manidp_common.h"

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

}  // namespace cuda
}  // namespace manidp
