// CUDA kernels of the GPU ops manidp::gpu_gate and manidp::gated_conv, whose schemas are
// defined with the others in csrc/registration.cpp (docs/DESIGN.md 7.2, 7.5).
#include <torch/library.h>

#include "manidp_cuda.cuh"

TORCH_LIBRARY_IMPL(manidp, CUDA, m) {
  m.impl("gpu_gate", &manidp::cuda::gate);
  m.impl("gated_conv", &manidp::cuda::gated_conv);
}
