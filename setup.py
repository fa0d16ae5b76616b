"""Builds the compiled extension spidr._C from csrc/ and ships kernels/ as spidr.kernels.

Build against the torch that will run it: install torch first, then
``pip install --no-build-isolation -e .`` (an isolated build would compile against another torch).
CUDA sources are compiled when a CUDA toolkit and a CUDA build of torch are both present;
``SPIDR_BUILD_CUDA=0`` or ``1`` overrides that decision.
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension


def want_cuda() -> bool:
    override = os.environ.get("SPIDR_BUILD_CUDA")
    if override is not None:
        return override.strip() not in ("", "0", "false", "no")
    import torch

    return cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None


def extension():
    sources = ["csrc/spidr_ext.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    macros = []
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("SPIDR_WITH_CUDA", None))
        return cpp_extension.CUDAExtension(
            "spidr._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "spidr._C", sources, define_macros=macros, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]
    )


setup(
    packages=[*find_packages(include=["spidr", "spidr.*"]), "spidr.kernels"],
    package_dir={"spidr.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
