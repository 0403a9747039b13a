"""Builds the optional C++/CUDA extension `lol_kernels._C` from `csrc/`.

Metadata lives in pyproject.toml. With a CPU-only torch only the C++ sources are built; the
`.cu` sources are added when torch has CUDA. With no sources (or no compiler) the package still
installs and every op falls back to its PyTorch reference.
"""

import glob
import os

from setuptools import setup


def _extensions():
    cpp = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    if not cpp or os.environ.get("LOL_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension as ce

    cu = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    use_cuda = bool(cu) and torch.version.cuda is not None and ce.CUDA_HOME is not None
    # -ffp-contract=off: no FMA contraction, so the router's fp32 scores are bit-exact vs torch
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
    kwargs = dict(
        name="lol_kernels._C",
        include_dirs=[os.path.abspath("csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if use_cuda:
        ext = ce.CUDAExtension(
            sources=cpp + cu,
            extra_compile_args={"cxx": cxx + ["-DLOL_WITH_CUDA"], "nvcc": ["-O3", "-std=c++17"]},
            **kwargs,
        )
    else:
        ext = ce.CppExtension(sources=cpp, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": ce.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
