"""Ahead-of-time compilation of the Triton kernels for sm_90, and what their machine code says (docs/DESIGN.md 7.4).

No GPU is needed: Triton compiles to PTX and, with its bundled ``ptxas``, to a cubin; ``ptxas -v``
reports registers, spills and shared memory, and ``cuobjdump -sass`` gives the instructions.
:data:`CASES` are the configurations that matter (the fixed config of each main launch shape);
``tests/test_gpu_compile.py`` asserts on them and ``benchmarks/gpu_kernel_table.py`` tabulates them.

Run as a module (``python -m manidp.kernels.aot``) it prints the statistics of every case as JSON;
it must run in a process without ``TRITON_INTERPRET`` (the interpreter does not compile).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional

__all__ = ["AotCase", "CASES", "compile_case", "kernel_stats", "all_stats", "tool", "nvcc_ptxas_stats",
           "nvcc_kernel_stats"]

SM = 90
# Instructions counted in the SASS: tensor cores (HGMMA: wgmma; HMMA: mma.sync), async copies
# (LDGSTS: cp.async; UTMALDG: TMA), global loads by width, local memory (spills).
OPCODES = ("HGMMA", "HMMA", "LDGSTS", "UTMALDG", "LDG.E.128", "LDG.E.64", "LDG.E.U16", "LDG.E", "LDL", "STL",
           "FFMA")


@dataclass
class AotCase:
    """One kernel compiled with one config: ``kernel`` is ``conv`` or ``gate``."""

    name: str
    kernel: str
    dtype: str = "fp16"
    mode: str = "conv1"
    ksize: int = 3
    stride: int = 1
    precision: str = "ieee"
    block_m: int = 64
    meta: Dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    main: bool = False  # a main configuration: must use wgmma and async copies


def _conv(name: str, dtype: str, mode: str, ksize: int, stride: int, precision: str, block_m: int,
          main: bool = False, cin: int = 64, cout: int = 64) -> AotCase:
    """The case of a conv launch with the fixed config (:func:`manidp.kernels.gated_conv.fixed_config`)."""
    from .gated_conv import fixed_config
    cfg = fixed_config({"CIN": cin, "COUT": cout, "BLOCK_M": block_m})
    return AotCase(name, "conv", dtype, mode, ksize, stride, precision, block_m, dict(cfg.kwargs), cfg.num_warps,
                   cfg.num_stages, main)


def _gate(name: str, hid_p: int) -> AotCase:
    """The case of a gate launch with the fixed config (:func:`manidp.kernels.gate.fixed_config`)."""
    from .gate import fixed_config
    cfg = fixed_config({"HID_P": hid_p})
    return AotCase(name, "gate", "fp32", meta=dict(cfg.kwargs, HID_P=hid_p), num_warps=cfg.num_warps,
                   num_stages=cfg.num_stages)


def _cases() -> List[AotCase]:
    return [
        _conv("conv1 fp16 3x3 s1 m64", "fp16", "conv1", 3, 1, "ieee", 64, main=True),
        _conv("conv1 fp16 3x3 s1 m128", "fp16", "conv1", 3, 1, "ieee", 128, main=True),
        _conv("conv1 fp16 3x3 s2 m64", "fp16", "conv1", 3, 2, "ieee", 64),
        _conv("conv2 fp16 3x3 s1 m64", "fp16", "conv2", 3, 1, "ieee", 64, main=True),
        _conv("conv2 fp16 3x3 s1 m128", "fp16", "conv2", 3, 1, "ieee", 128, main=True),
        _conv("conv2 bf16 3x3 s1 m64", "bf16", "conv2", 3, 1, "ieee", 64),
        _conv("plain fp16 1x1 s2 m64", "fp16", "plain", 1, 2, "ieee", 64),
        _conv("conv1 fp32 3x3 s1 m64 tf32", "fp32", "conv1", 3, 1, "tf32", 64),
        _conv("conv2 fp32 3x3 s1 m64 ieee", "fp32", "conv2", 3, 1, "ieee", 64),
        _gate("gate fp32 hid64", 64),
        _gate("gate fp32 hid256", 256),
    ]


CASES = _cases()


def tool(name: str) -> Optional[str]:
    """Path of a CUDA tool (``ptxas``, ``cuobjdump``): Triton's bundled copy first, then PATH."""
    try:
        import triton.backends.nvidia as nv
        path = os.path.join(os.path.dirname(nv.__file__), "bin", name)
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which(name)


def _conv_source(case: AotCase):
    from .build_config import CONV_MODES, MODE_CONV2, MODE_PLAIN
    from .gated_conv import SHAPE_ARGS, gated_conv_kernel
    p, mode = f"*{case.dtype}", CONV_MODES[case.mode]
    sig = {"x_ptr": p, "w_ptr": p, "bias_ptr": "*fp32", "in_idx_ptr": "*i32", "in_cnt_ptr": "*i32",
           "out_idx_ptr": "*i32", "out_cnt_ptr": "*i32", "gate_ptr": "*fp32", "res_ptr": p, "out_ptr": p,
           "part_ptr": "*fp32", "ws_ptr": "*fp32", "sem_ptr": "*i32",
           **{k: "i32" for k in ["NB", "H", "W", "HO", "WO", "CIN_BUF", "CIN", "COUT", "T", "NB_BUCKET", "SPLIT"]}}
    const = dict(STRIDE=case.stride, KS=case.ksize, PAD=case.ksize // 2, MODE=mode,
                 HAS_IN_IDX=mode == MODE_CONV2, WRITE_PART=mode != MODE_PLAIN,
                 PRECISION=case.precision, UPCAST=False, BLOCK_M=case.block_m, **case.meta)
    divisible = [k for k in sig if k.endswith("_ptr")] + [k for k in ("CIN_BUF", "CIN", "COUT")
                                                           if k not in SHAPE_ARGS]
    return gated_conv_kernel, sig, const, divisible


def _gate_source(case: AotCase):
    from .gate import gate_kernel
    sig = {"part_ptr": "*fp32", "fc1_ptr": "*fp32", "fc2_ptr": "*fp32", "bias_ptr": "*fp32", "thr_ptr": "*fp32",
           "g_ptr": "*fp32", "idx_ptr": "*i32", "cnt_ptr": "*i32", "NB": "i32", "T": "i32", "CIN": "i32",
           "HID": "i32", "C": "i32", "HW": "i32", "NB_BUCKET": "i32", "clamp_max": "fp32"}
    return gate_kernel, sig, dict(case.meta), [k for k in sig if k.endswith("_ptr")]


def compile_case(case: AotCase):
    """Triton's compiled kernel of ``case`` for sm_90 (``.asm`` holds ``ptx`` and ``cubin``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    kernel, sig, const, divisible = (_conv_source if case.kernel == "conv" else _gate_source)(case)
    jit = JITFunction(kernel.fn)
    sig = dict(sig, **{k: "constexpr" for k in const})
    attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(jit, sig, const, attrs)
    return triton.compile(src, target=GPUTarget("cuda", SM, 32),
                          options=dict(num_warps=case.num_warps, num_stages=case.num_stages))


def _run_tool(name: str, content, filename: str, make_args) -> str:
    """Run the CUDA tool ``name`` on ``content`` written to a temporary ``filename``; its output.

    ``make_args(path, tmpdir)`` gives the tool's arguments.
    """
    exe = tool(name)
    if exe is None:
        raise RuntimeError(f"{name} not found (Triton's bundled copy nor PATH)")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, filename)
        with open(path, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
        r = subprocess.run([exe, *make_args(path, d)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"{name} failed: {r.stderr[-2000:]}")
    return r.stdout + r.stderr


def _ptxas_stats(ptx: str, arch: str) -> Dict[str, int]:
    """Registers, spill bytes and shared memory of the PTX, from ``ptxas -v``."""
    return parse_ptxas_v(_run_tool("ptxas", ptx, "k.ptx",
                                   lambda path, d: ["-v", f"--gpu-name={arch}", path, "-o", os.path.join(d, "k.cubin")]))


def parse_ptxas_v(text: str) -> Dict[str, int]:
    """``registers``, ``spill_stores``, ``spill_loads`` (bytes, summed over functions) and ``smem_static``
    of ``ptxas -v`` output."""
    def total(pattern: str) -> int:
        return sum(int(v) for v in re.findall(pattern, text))
    regs = [int(v) for v in re.findall(r"Used (\d+) registers", text)]
    return {"registers": max(regs) if regs else -1,
            "spill_stores": total(r"(\d+) bytes spill stores"), "spill_loads": total(r"(\d+) bytes spill loads"),
            "smem_static": total(r"(\d+) bytes smem")}


def sass_counts(cubin: bytes) -> Dict[str, int]:
    """How many times each opcode of :data:`OPCODES` occurs in the SASS of ``cubin`` (``cuobjdump -sass``)."""
    return opcode_counts(_run_tool("cuobjdump", cubin, "k.cubin", lambda path, d: ["-sass", path]))


def opcode_counts(sass: str) -> Dict[str, int]:
    """How many times each opcode of :data:`OPCODES` occurs in ``cuobjdump -sass`` text."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)", sass)
    return {name: sum(1 for o in ops if _is_opcode(o, name)) for name in OPCODES}


_WIDTHS = re.compile(r"^(\d+|[US](8|16))$")


def _is_opcode(op: str, name: str) -> bool:
    """``op`` is ``name`` with or without modifiers (``HGMMA.64x64x16.F32``), but not a load of another
    width (``LDG.E`` is not ``LDG.E.128`` nor ``LDG.E.U16``)."""
    if op == name:
        return True
    if not op.startswith(name + "."):
        return False
    return not (name.startswith("LDG") and _WIDTHS.match(op[len(name) + 1:].split(".")[0]))


def kernel_stats(case: AotCase) -> Dict:
    """Everything the checks and the table read about ``case``: registers, spills, shared memory, opcodes."""
    compiled = compile_case(case)
    md = compiled.metadata
    target_arch = "sm_90a"
    stats = {"name": case.name, "main": case.main, "num_warps": case.num_warps, "num_stages": case.num_stages,
             "meta": dict(case.meta, BLOCK_M=case.block_m) if case.kernel == "conv" else dict(case.meta),
             "smem": int(getattr(md, "shared", 0) if not isinstance(md, dict) else md.get("shared", 0))}
    stats.update(_ptxas_stats(compiled.asm["ptx"], target_arch))
    stats["sass"] = sass_counts(compiled.asm["cubin"])
    return stats


def all_stats(names: Optional[List[str]] = None) -> List[Dict]:
    """:func:`kernel_stats` of every case of :data:`CASES` (or those named)."""
    return [kernel_stats(c) for c in CASES if names is None or c.name in names]


def main(argv=None) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("run without TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    names = (argv if argv is not None else sys.argv[1:]) or None
    json.dump(all_stats(names), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------- CUDA kernels (nvcc)
def cuda_sources() -> List[str]:
    """The CUDA sources of ``manidp._C`` (``csrc/cuda/*.cu``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    d = os.path.join(root, "csrc", "cuda")
    return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".cu"))


def nvcc_ptxas_stats(source: str, arch: str = "sm_90") -> Dict[str, Dict[str, int]]:
    """``ptxas -v`` statistics per kernel of one CUDA source, compiled with ``setup.py``'s nvcc flags.

    Returns ``{kernel (mangled name): {"registers", "spill_stores", "spill_loads", "smem_static"}}``.
    """
    with tempfile.TemporaryDirectory() as d:
        return parse_ptxas_per_function(_nvcc_compile(source, arch, os.path.join(d, "k.o")))


def nvcc_kernel_stats(source: str, arch: str = "sm_90") -> Dict[str, Dict]:
    """:func:`nvcc_ptxas_stats` of one CUDA source with, per kernel, ``"sass"``: its :func:`opcode_counts`."""
    with tempfile.TemporaryDirectory() as d:
        obj = os.path.join(d, "k.o")
        stats = parse_ptxas_per_function(_nvcc_compile(source, arch, obj))
        with open(obj, "rb") as f:
            sass = _run_tool("cuobjdump", f.read(), "k.o", lambda path, tmp: ["-sass", path])
    for name, text in _sass_per_function(sass).items():
        if name in stats:
            stats[name]["sass"] = opcode_counts(text)
    return stats


def _nvcc_compile(source: str, arch: str, obj: str) -> str:
    """Compile ``source`` to the object file ``obj`` with ``setup.py``'s nvcc flags; the ``ptxas -v`` output."""
    import torch.utils.cpp_extension as ext
    from . import build_config
    nvcc = shutil.which("nvcc") or os.path.join(ext.CUDA_HOME or "/usr/local/cuda", "bin", "nvcc")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    includes = [f"-I{p}" for p in ext.include_paths(device_type="cuda")] + [f"-I{os.path.join(root, 'csrc')}"]
    cmd = [nvcc, "-c", source, "-o", obj, f"-arch={arch}", "-Xptxas", "-v",
           "--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           *build_config.nvcc_flags(), *includes]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}: {r.stderr[-3000:]}")
    return r.stderr + r.stdout


def _sass_per_function(sass: str) -> Dict[str, str]:
    """``cuobjdump -sass`` text split per kernel: ``{mangled name: its SASS}``."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def parse_ptxas_per_function(text: str) -> Dict[str, Dict[str, int]]:
    """Split ``ptxas -v`` output at each "Compiling entry function" and parse each part."""
    out = {}
    for chunk in re.split(r"(?=ptxas info\s*: Compiling entry function)", text):
        m = re.search(r"Compiling entry function '([^']+)'", chunk)
        if m:
            out[m.group(1)] = parse_ptxas_v(chunk)
    return out
