"""The numbers and flags every build of the manidp kernels shares, defined once (docs/DESIGN.md 7.2, 7.5).

* Mode numbers of the ops: the strategies of the CPU op ``manidp::gated_block``, the epilogues of
  the GPU op ``manidp::gated_conv`` and its CUDA kernel choices; the channel padding of its conv1
  output.  Python and the Triton kernels
  import them from here; the C++ and CUDA sources receive them as compile definitions
  (:func:`define_flags`, read in ``csrc/manidp_common.h``), so no source holds a second copy.
* Compiler flags of the C++ and CUDA sources, used by ``setup.py`` and by the JIT build of
  ``manidp.deploy.cuda_backend.build_cuda_ops``.

Plain Python without imports: ``setup.py`` loads this file by path, before torch is importable.
"""

BLOCK_MODES = {"auto": 0, "instance": 1, "union": 2, "library": 3}
"""``mode`` of ``manidp::gated_block``: 0 lets the kernel choose, 1 one compact conv per instance
(gconv where the CPU has AVX-512 or AVX2), 2 one batched library conv over the union of the batch's
active channels, 3 one compact library conv per instance on gathered weights."""

CONV_MODES = {"plain": 0, "conv1": 1, "conv2": 2}
"""``mode`` of ``manidp::gated_conv``: 0 conv + bias (the shortcut), 1 the conv1 epilogue (compact
output), 2 the conv2 epilogue (residual add)."""

CONV_IMPLS = {"auto": 0, "simt": 1, "wmma": 2}
"""``impl`` of ``manidp::gated_conv`` (CUDA kernels only): 0 WMMA for fp16/bf16 where the GPU has
it and SIMT otherwise, 1 the SIMT kernel, 2 the WMMA kernel."""

MODE_PLAIN, MODE_CONV1, MODE_CONV2 = CONV_MODES["plain"], CONV_MODES["conv1"], CONV_MODES["conv2"]

CHANNEL_PAD = 16
"""The conv1 mode of ``manidp::gated_conv`` writes zeros after its compact output's active channels up
to a multiple of this many channels, and conv2 kernels may read them (docs/DESIGN.md 7.2): a bound
divisible by 16 lets every dtype's input tile be read 16 bytes at a time, and 16 is the
divisibility Triton specialises integer arguments on."""

CXX_FLAGS = ["-O3", "-std=c++20"]
NVCC_FLAGS = CXX_FLAGS + ["--use_fast_math"]
OPENMP_FLAGS = ["-fopenmp"]  # the CPU sources parallelise with OpenMP (through ATen)
DEFAULT_CUDA_ARCH = "9.0"    # H100/H200; TORCH_CUDA_ARCH_LIST overrides it


def definitions():
    """``(macro, value)`` pairs of every mode number, e.g. ``("MANIDP_CONV_MODE_CONV1", 1)``, and of
    :data:`CHANNEL_PAD`."""
    groups = (("BLOCK_MODE", BLOCK_MODES), ("CONV_MODE", CONV_MODES), ("CONV_IMPL", CONV_IMPLS))
    modes = [(f"MANIDP_{group}_{name.upper()}", value) for group, table in groups for name, value in table.items()]
    return modes + [("MANIDP_CHANNEL_PAD", CHANNEL_PAD)]


def define_flags():
    """The mode numbers as compiler flags (``-DNAME=VALUE``), for g++ and nvcc alike."""
    return [f"-D{name}={value}" for name, value in definitions()]


def cxx_flags(openmp: bool = False):
    """g++ flags of the C++ sources (``openmp``: the CPU kernels, which need OpenMP)."""
    return CXX_FLAGS + (OPENMP_FLAGS if openmp else []) + define_flags()


def nvcc_flags():
    """nvcc flags of the CUDA sources."""
    return NVCC_FLAGS + define_flags()


def default_cuda_arch(environ) -> None:
    """Set ``TORCH_CUDA_ARCH_LIST`` in ``environ`` to :data:`DEFAULT_CUDA_ARCH` unless it is set."""
    if not environ.get("TORCH_CUDA_ARCH_LIST"):
        environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH
