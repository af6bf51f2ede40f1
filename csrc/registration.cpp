// Python module `manidp._C` and the schemas of the `manidp` custom ops.
//
// Importing `manidp._C` loads this shared library, which runs the static
// TORCH_LIBRARY initialisers below; the ops are then reachable as
// `torch.ops.manidp.<name>`.  Schemas live here, in the one source file that is
// always built; device files add kernels with TORCH_LIBRARY_IMPL(manidp, <Key>, m)
// and new ops with TORCH_LIBRARY_FRAGMENT(manidp, m).  Fake (meta) kernels are
// registered from Python (manidp/deploy/ops.py).
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

// A fragment, not TORCH_LIBRARY: the CUDA sources may define ops in the same namespace and only
// one TORCH_LIBRARY block per namespace is allowed in a process.
TORCH_LIBRARY_FRAGMENT(manidp, m) {
  // Gate of DESIGN 1.1 on pooled inputs (N, Cin): fc1, relu, fc2 + bias, relu, clamp, then
  // threshold (g >= threshold and g > 0) and compaction.  Returns g (N, C) fp32 (pre-threshold),
  // idx (N, C) int32 with each row's active channels first, ascending, then -1, and cnt (N,) int32.
  m.def("gate_compact(Tensor pooled, Tensor fc1, Tensor fc2, Tensor fc2_bias, Tensor threshold, "
        "float clamp_max) -> (Tensor g, Tensor idx, Tensor cnt)");
  // One gated basic block (DESIGN 3.2) on x (N, Cin, H, W) with BN-folded weights
  // w1 (C, Cin, 3, 3), w2 (C, C, 3, 3), optional 1x1 shortcut ws (C, Cin, 1, 1).
  // Returns out (N, C, H', W'), idx1/idx2 (N, C) int32 and cnt1/cnt2 (N,) int32 as gate_compact.
  // mode: 0 picks the strategy, 1 one compact conv per instance (gconv where the CPU has
  // AVX-512 or AVX2), 2 batched library convs over the union of the batch's active channels, 3 one
  // compact library conv per instance on gathered weights.
  m.def("gated_block(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor? ws, Tensor? bs, "
        "Tensor g1_fc1, Tensor g1_fc2, Tensor g1_bias, Tensor g1_threshold, "
        "Tensor g2_fc1, Tensor g2_fc2, Tensor g2_bias, Tensor g2_threshold, "
        "float clamp_max, int stride, int mode=0) "
        "-> (Tensor out, Tensor idx1, Tensor cnt1, Tensor idx2, Tensor cnt2)");
  // The instruction set of the gathered conv kernel on this CPU: "avx512", "avx2" or "none"
  // (gathered weights and the library conv instead).
  m.def("gconv_isa() -> str", [] { return manidp::detail::gconv_isa_name(); });
}

TORCH_LIBRARY_IMPL(manidp, CPU, m) {
  m.impl("gate_compact", &manidp::gate_compact_cpu);
  m.impl("gated_block", &manidp::gated_block_cpu);
}
