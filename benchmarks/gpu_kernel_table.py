"""Tables of the GPU kernels: machine-code statistics (sm_90, no GPU needed) and per-layer timings.

    python benchmarks/gpu_kernel_table.py                          # print the kernel table
    python benchmarks/gpu_kernel_table.py --cuda --update-notes    # rewrite it in gpu_kernel_notes.md
    python benchmarks/gpu_kernel_table.py --layers OUT/bench_gpu.json --write OUT/layers.md

The kernel table: every configuration of :data:`manidp.kernels.aot.CASES` compiled ahead of time
for sm_90 with the installed Triton (registers, spills, shared memory, and counts of the SASS
instructions that say whether tensor cores and async copies are used), and with ``--cuda`` the
``ptxas -v`` statistics of the CUDA kernels.  ``--update-notes`` replaces the part of
``benchmarks/gpu_kernel_notes.md`` between the ``kernel-table`` markers.  Must run without
``TRITON_INTERPRET``.

The per-layer table: the ``layers`` rows of a ``bench_gpu.py --layers`` report, as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

NOTES = os.path.join(ROOT, "benchmarks", "gpu_kernel_notes.md")
BEGIN, END = "<!-- kernel-table:begin -->", "<!-- kernel-table:end -->"
SASS_COLUMNS = ("HGMMA", "HMMA", "LDGSTS", "LDG.E.128", "LDG.E.64", "LDG.E.U16", "LDL", "STL")


def triton_table(stats) -> list:
    """Markdown lines of the Triton kernels' statistics (:func:`manidp.kernels.aot.all_stats`)."""
    head = "| kernel | config | warps | stages | registers | spill B (st/ld) | smem B | " + \
        " | ".join(SASS_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (6 + len(SASS_COLUMNS))]
    for s in stats:
        meta = " ".join(f"{k}={v}" for k, v in sorted(s["meta"].items()))
        lines.append(f"| {s['name']}{' (main)' if s['main'] else ''} | {meta} | {s['num_warps']} | {s['num_stages']} | "
                     f"{s['registers']} | {s['spill_stores']}/{s['spill_loads']} | {s['smem']} | " +
                     " | ".join(str(s["sass"].get(c, 0)) for c in SASS_COLUMNS) + " |")
    return lines


def short_kernel_name(mangled: str) -> str:
    """``conv_wmma_kernel<c10::Half, 64>`` for a mangled CUDA kernel name (``c++filt`` where present)."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return mangled
    name = subprocess.run([cxxfilt, mangled], capture_output=True, text=True).stdout.strip() or mangled
    name = re.sub(r"^void ", "", name).replace("(anonymous namespace)::", "")
    name = re.sub(r"\(.*\)$", "", name)  # the parameter list
    return re.sub(r"^.*::", "", name.split("<")[0]) + ("<" + name.split("<", 1)[1] if "<" in name else "")


CUDA_SASS_COLUMNS = ("HMMA", "LDGSTS", "LDG.E.128", "LDG.E.U16", "LDL", "STL")


def cuda_table() -> list:
    """Markdown lines of the CUDA kernels' ``ptxas -v`` statistics and instruction mix (sm_90, setup.py's nvcc
    flags)."""
    from manidp.kernels import aot
    lines = ["| source | kernel | registers | spill B (st/ld) | static smem B | " + " | ".join(CUDA_SASS_COLUMNS) + " |",
             "|" + "---|" * (5 + len(CUDA_SASS_COLUMNS))]
    for src in aot.cuda_sources():
        for kernel, s in aot.nvcc_kernel_stats(src).items():
            sass = s.get("sass", {})
            lines.append(f"| {os.path.basename(src)} | `{short_kernel_name(kernel)}` | {s['registers']} | "
                         f"{s['spill_stores']}/{s['spill_loads']} | {s['smem_static']} | " +
                         " | ".join(str(sass.get(c, 0)) for c in CUDA_SASS_COLUMNS) + " |")
    return lines


def kernel_tables(with_cuda: bool) -> str:
    import triton

    from manidp.kernels import aot
    lines = [f"Ahead-of-time for sm_90 with triton {triton.__version__} "
             f"(`python benchmarks/gpu_kernel_table.py{' --cuda' if with_cuda else ''} --update-notes`).", ""]
    lines += triton_table(aot.all_stats())
    if with_cuda:
        lines += ["", *cuda_table()]
    return "\n".join(lines) + "\n"


def layers_table(report_path: str) -> str:
    """The per-layer rows of a ``bench_gpu.py --layers`` report as Markdown (every numeric column)."""
    with open(report_path) as f:
        rows = json.load(f).get("layers", [])
    if not rows:
        return "No per-layer rows in the report.\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def update_notes(table: str, path: str = NOTES) -> None:
    """Replace the text between the kernel-table markers of ``path`` (appended with a heading if absent)."""
    with open(path) as f:
        text = f.read()
    block = f"{BEGIN}\n{table}{END}"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Compiled kernels (sm_90)\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", metavar="JSON", help="per-layer table of this bench_gpu.json instead")
    ap.add_argument("--cuda", action="store_true", help="also the CUDA kernels (nvcc + ptxas -v)")
    ap.add_argument("--write", metavar="FILE", help="write the table to FILE")
    ap.add_argument("--update-notes", action="store_true", help=f"rewrite the table in {os.path.relpath(NOTES, ROOT)}")
    args = ap.parse_args(argv)
    if args.layers:
        table = layers_table(args.layers)
    else:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("run without TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
            return 2
        table = kernel_tables(args.cuda)
    if args.write:
        with open(args.write, "w") as f:
            f.write(table)
    if args.update_notes and not args.layers:
        update_notes(table)
    if not args.write and not args.update_notes:
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
