"""Build and install manidp.

The C++ extension ``manidp._C`` is built from ``csrc/*.cpp`` always, and from
``csrc/cuda/*.cu`` where nvcc and a CUDA build of torch are present
(``MANIDP_BUILD_CUDA=1`` forces the CUDA part, ``MANIDP_BUILD_CUDA=0`` skips it), with the
flags and mode numbers of ``kernels/build_config.py`` (shared with the JIT build of
``manidp.deploy.cuda_backend.build_cuda_ops``).  Triton kernels live in ``kernels/`` and install
as ``manidp.kernels``.
"""

import glob
import importlib.util
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _set_cuda_home() -> None:
    """Point CUDA_HOME at a real toolkit when nvcc on PATH is only a wrapper script.

    torch derives CUDA_HOME from ``which nvcc`` (``/usr/local/bin/nvcc`` -> ``/usr/local``),
    which has no CUDA headers or libraries when nvcc is a wrapper; the link then fails
    on ``-lcudart``.  Must run before ``torch.utils.cpp_extension`` is imported.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    if guess and os.path.isfile(os.path.join(guess, "include", "cuda_runtime.h")):
        return
    for cand in ("/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)):
        if os.path.isfile(os.path.join(cand, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = cand
            return


_set_cuda_home()


def _build_config():
    """``kernels/build_config.py``, loaded by path: it imports nothing, so torch need not be importable."""
    path = os.path.join(ROOT, "kernels", "build_config.py")
    spec = importlib.util.spec_from_file_location("manidp_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _want_cuda() -> bool:
    flag = os.environ.get("MANIDP_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extensions():
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:  # metadata-only invocations (e.g. egg_info without torch)
        return [], {}
    config = _build_config()
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    kw = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=config.OPENMP_FLAGS)
    cxx = config.cxx_flags(openmp=True)
    if _want_cuda() and cu:
        config.default_cuda_arch(os.environ)
        ext = CUDAExtension("manidp._C", cpp + cu, extra_compile_args={"cxx": cxx, "nvcc": config.nvcc_flags()}, **kw)
    else:
        ext = CppExtension("manidp._C", cpp, extra_compile_args={"cxx": cxx}, **kw)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="manidp",
    version="0.1.0",
    description="Manifold Regularized Dynamic Network Pruning: training and fast deployment",
    python_requires=">=3.9",
    packages=["manidp", "manidp.bench", "manidp.deploy", "manidp.kernels"],
    package_dir={"manidp.kernels": "kernels"},
    package_data={"manidp": ["assets/*.pt", "assets/*.json"], "manidp.bench": ["*.json"]},
    install_requires=["torch>=2.4", "torchvision", "tqdm", "numpy", "matplotlib"],
    extras_require={"test": ["pytest", "hypothesis"],
                    "bench": ["onnx", "onnxscript", "onnxruntime", "openvino"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": [
        "manidp-train=manidp.train:main",
        "manidp-bench=manidp.bench:main",
        "manidp-flops=manidp.flops_cli:main",
    ]},
)
