// Schemas and CUDA kernels of the manidp::cuda_* ops (see manidp_cuda.cuh and
// manidp/deploy/gpu_common.py for the semantics; fake kernels are registered from
// Python in manidp/deploy/cuda_backend.py).  A TORCH_LIBRARY_FRAGMENT: the CPU sources
// own the other manidp ops in the same extension.
#include <torch/library.h>

#include "manidp_cuda.cuh"

TORCH_LIBRARY_FRAGMENT(manidp, m) {
  m.def("cuda_gate(Tensor part, int hw, Tensor fc1, Tensor fc2, Tensor fc2_bias, Tensor threshold, "
        "float clamp_max) -> (Tensor g, Tensor idx, Tensor cnt)");
  m.def("cuda_gated_conv(Tensor x, Tensor w, Tensor bias, Tensor? in_idx, Tensor? in_cnt, Tensor? out_idx, "
        "Tensor? out_cnt, Tensor? gate, Tensor? res, int stride, int ksize, int mode, int block_m, "
        "bool write_part, bool tf32, int impl=0) -> (Tensor out, Tensor part)");
}

TORCH_LIBRARY_IMPL(manidp, CUDA, m) {
  m.impl("cuda_gate", &manidp::cuda::gate);
  m.impl("cuda_gated_conv", &manidp::cuda::gated_conv);
}
