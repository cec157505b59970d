"""Install ``causal_conv1d``: depthwise causal 1-D convolution (PyTorch reference + CUDA kernel).
The kernel in ``csrc/`` becomes ``causal_conv1d._causal_conv1d_cuda`` when torch has CUDA and nvcc is
found; otherwise the build is skipped with one message (see ``tools/cuda_build.py`` for the switches)."""
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
from cuda_build import cuda_extension_plan  # noqa: E402

ext_modules, cmdclass = cuda_extension_plan(
    "causal_conv1d", "causal_conv1d._causal_conv1d_cuda",
    ["csrc/causal_conv1d.cpp", "csrc/causal_conv1d_kernels.cu"],
    os.path.join(HERE, "csrc"))

setup(
    name="causal_conv1d",
    version="0.3.0",
    description="Depthwise causal conv1d (PyTorch reference + CUDA kernel)",
    packages=find_packages(include=["causal_conv1d", "causal_conv1d.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
