"""Install ``mamba_ssm``: selective-scan ops (PyTorch reference + CUDA kernels) and the tri-orientated
Mamba block used by SegMamba. The CUDA kernels in ``csrc/`` become ``mamba_ssm._selective_scan_cuda``
when torch has CUDA and nvcc is found; otherwise the build is skipped with one message
(see ``tools/cuda_build.py`` for the switches)."""
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
from cuda_build import cuda_extension_plan  # noqa: E402

ext_modules, cmdclass = cuda_extension_plan(
    "mamba_ssm", "mamba_ssm._selective_scan_cuda",
    ["csrc/selective_scan.cpp", "csrc/selective_scan_fwd.cu", "csrc/selective_scan_bwd.cu"],
    os.path.join(HERE, "csrc"))

setup(
    name="mamba_ssm",
    version="0.3.0",
    description="Selective-scan ops (PyTorch reference + CUDA kernels) and the tri-orientated Mamba block",
    packages=find_packages(include=["mamba_ssm", "mamba_ssm.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "einops"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
