// What the CPU and the CUDA sources of manidp share: the ops' mode numbers and the conv output size.
//
// The mode numbers are defined once, in kernels/build_config.py, which Python and the Triton
// kernels import; setup.py and the JIT build pass them to the compilers as -D flags
// (build_config.define_flags()), so this header names them but holds no values
// (docs/DESIGN.md 7.2).
#pragma once

#include <cstdint>

#if !defined(MANIDP_BLOCK_MODE_AUTO) || !defined(MANIDP_BLOCK_MODE_INSTANCE) || !defined(MANIDP_BLOCK_MODE_UNION) || \
    !defined(MANIDP_BLOCK_MODE_LIBRARY) || !defined(MANIDP_CONV_MODE_PLAIN) || !defined(MANIDP_CONV_MODE_CONV1) ||  \
    !defined(MANIDP_CONV_MODE_CONV2) || !defined(MANIDP_CONV_IMPL_AUTO) || !defined(MANIDP_CONV_IMPL_SIMT) ||       \
    !defined(MANIDP_CONV_IMPL_WMMA)
#error "manidp mode numbers are undefined: build with setup.py or build_cuda_ops (flags from kernels/build_config.py)"
#endif

namespace manidp {

// `mode` of manidp::gated_block (CPU): the strategy.
enum BlockMode : int64_t {
  kBlockAuto = MANIDP_BLOCK_MODE_AUTO,
  kBlockInstance = MANIDP_BLOCK_MODE_INSTANCE,
  kBlockUnion = MANIDP_BLOCK_MODE_UNION,
  kBlockLibrary = MANIDP_BLOCK_MODE_LIBRARY,
};

// `mode` of manidp::gated_conv (GPU): the epilogue.
enum ConvMode : int64_t {
  kModePlain = MANIDP_CONV_MODE_PLAIN,
  kModeConv1 = MANIDP_CONV_MODE_CONV1,
  kModeConv2 = MANIDP_CONV_MODE_CONV2,
};

// `impl` of manidp::gated_conv (CUDA): the conv kernel.
enum ConvImpl : int64_t {
  kImplAuto = MANIDP_CONV_IMPL_AUTO,
  kImplSimt = MANIDP_CONV_IMPL_SIMT,
  kImplWmma = MANIDP_CONV_IMPL_WMMA,
};

// Output size of a convolution along one axis (manidp.flops.conv_out_size on the Python side).
inline int64_t conv_out_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding) {
  return (size + 2 * padding - kernel) / stride + 1;
}

}  // namespace manidp
