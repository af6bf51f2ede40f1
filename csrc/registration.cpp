// Python module `manidp._C` and the schema of every manidp op (docs/DESIGN.md 7.2).
//
// Importing `manidp._C` loads this shared library, which runs the static initialisers below;
// the ops are then reachable as `torch.ops.manidp.<name>`.  Every schema is defined here, in
// the one source file that is always built, and each device adds its kernels of the same schema
// under its dispatch key: CPU below, CUDA in csrc/cuda/registration_cuda.cu.  The Triton ops
// (manidp.kernels.ops) take their schemas from the GPU ops defined here.  Fake kernels of every
// op are in manidp.kernels.fake (docs/DESIGN.md 7.3).
#include <Python.h>
#include <torch/library.h>

#include "manidp_cpu.h"

extern "C" {
// An empty module: importing it is only a way to load the library.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "Custom ops of manidp, registered as torch.ops.manidp.* (see manidp.deploy.ops).",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(manidp, m) {
  // ---- CPU ops
  // Gate of docs/DESIGN.md 1.1 on pooled inputs (N, Cin): fc1, relu, fc2 + bias, relu, clamp, then
  // threshold (g >= threshold and g > 0) and compaction.  Returns g (N, C) fp32 (pre-threshold),
  // idx (N, C) int32 with each row's active channels first, ascending, then -1, and cnt (N,) int32.
  m.def("gate_compact(Tensor pooled, Tensor fc1, Tensor fc2, Tensor fc2_bias, Tensor threshold, "
        "float clamp_max) -> (Tensor g, Tensor idx, Tensor cnt)");
  // One gated basic block (docs/DESIGN.md 3.2) on x (N, Cin, H, W) with BN-folded weights
  // w1 (C, Cin, 3, 3), w2 (C, C, 3, 3), optional 1x1 shortcut ws (C, Cin, 1, 1).  Returns
  // out (N, C, H', W') and the active counts cnt1/cnt2 (N,) int32 of the two gates.  mode: the
  // strategy (BlockMode in manidp_common.h; docs/DESIGN.md 7.6).
  m.def("gated_block(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? ws, Tensor? bs, "
        "Tensor g1_fc1, Tensor g1_fc2, Tensor g1_bias, Tensor g1_threshold, "
        "Tensor g2_fc1, Tensor g2_fc2, Tensor g2_bias, Tensor g2_threshold, "
        "float clamp_max, int stride, int mode=0) -> (Tensor out, Tensor cnt1, Tensor cnt2)");
  // The instruction set of the gathered conv kernel on this CPU: "avx512", "avx2" or "none"
  // (gathered weights and the library conv instead).
  m.def("gconv_isa() -> str", [] { return manidp::detail::gconv_isa_name(); });
  // The whole gated network on the CPU in one call: stem, every block, classifier
  // (docs/DESIGN.md 7.7).  forward(x) -> (logits, counts (N, 2 * blocks) int32).
  manidp::register_cpu_network(m);

  // ---- GPU ops: CUDA kernels in csrc/cuda, Triton kernels in kernels/ (docs/DESIGN.md 7.2)
  // The gate from per-tile channel sums part (N, T, Cin): pooled input = part.sum(1) / hw.
  // Returns g (N, C) fp32, idx (N, C) int32 (per instance the active channels ascending, then the
  // inactive ones) and cnt (N,) int32.
  m.def("gpu_gate(Tensor part, int hw, Tensor fc1, Tensor fc2, Tensor fc2_bias, Tensor threshold, "
        "float clamp_max) -> (Tensor g, Tensor idx, Tensor cnt)");
  // Gathered implicit-GEMM conv of channels-last x (N, H, W, Cbuf) with w (Cout, k*k, Cin) and a
  // fused epilogue chosen by mode (ConvMode).  Returns out (N, Ho, Wo, Cout) and the per-tile
  // channel sums part (N, T, Cout) fp32.  tf32: the Triton kernel may use TF32 for fp32 inputs;
  // impl: the CUDA kernel (ConvImpl); each backend ignores the other's argument.
  m.def("gated_conv(Tensor x, Tensor w, Tensor bias, Tensor? in_idx, Tensor? in_cnt, Tensor? out_idx, "
        "Tensor? out_cnt, Tensor? gate, Tensor? res, int stride, int ksize, int mode, int block_m, "
        "bool write_part, bool tf32, int impl=0) -> (Tensor out, Tensor part)");
}

TORCH_LIBRARY_IMPL(manidp, CPU, m) {
  m.impl("gate_compact", &manidp::gate_compact_cpu);
  m.impl("gated_block", &manidp::gated_block_cpu);
}
