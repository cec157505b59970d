"""Shared logic of ``mamba/setup.py`` and ``causal-conv1d/setup.py``: build the CUDA extension when
possible, otherwise skip it with one clear message. Never downloads anything; a failed compile does not
fail the install (the PyTorch implementation stays usable).

Environment variables:
  SEGMAMBA_SKIP_CUDA_BUILD=1   never build the kernels
  SEGMAMBA_FORCE_CUDA_BUILD=1  build even if no GPU is visible (e.g. in a container build step)
  TORCH_CUDA_ARCH_LIST         architectures to build for (default "8.0;9.0")
"""
import os
import sys

NVCC_FLAGS = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
              "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]


def cuda_extension_plan(pkg, ext_name, sources, include_dir):
    """Return ``(ext_modules, cmdclass)`` for ``setup()``; ``([], {})`` when the build is skipped."""

    # pip runs setup.py once for metadata and once to build; only the build run reports the decision.
    metadata_only = any(cmd in sys.argv for cmd in ("egg_info", "dist_info"))

    def say(msg):
        if not metadata_only:
            print(f"[{pkg} setup] {msg}", file=sys.stderr)

    if os.environ.get("SEGMAMBA_SKIP_CUDA_BUILD", "0") == "1":
        say("SEGMAMBA_SKIP_CUDA_BUILD=1: CUDA kernels not built; the PyTorch implementation will be used.")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001 - torch missing: still installable, reference path only
        say(f"torch not importable at build time ({exc}); CUDA kernels not built. "
            "Install torch first and use `pip install --no-build-isolation` to build them.")
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        say("CUDA kernels not built (torch is a CPU build or nvcc/CUDA_HOME not found); "
            "the PyTorch implementation will be used.")
        return [], {}
    force = os.environ.get("SEGMAMBA_FORCE_CUDA_BUILD", "0") == "1"
    if not force and not torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        say("no GPU visible and TORCH_CUDA_ARCH_LIST unset: CUDA kernels not built "
            "(set SEGMAMBA_FORCE_CUDA_BUILD=1 to build anyway).")
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # optional=True: when the compile fails, setuptools skips copying the missing library instead of
    # failing the (editable) install; TolerantBuildExtension turns the failure into one message.
    ext = CUDAExtension(name=ext_name, sources=sources, include_dirs=[include_dir], optional=True,
                        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": list(NVCC_FLAGS)})

    class TolerantBuildExtension(BuildExtension):
        """A failed kernel build must not fail the install: the PyTorch path still works."""

        def build_extension(self, extension):
            try:
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001 - report and continue
                say(f"building {extension.name} FAILED ({exc}); the PyTorch implementation will be "
                    "used. Re-run with `pip install -v` to see the compiler output.")

    say(f"building CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} "
        f"(CUDA {torch.version.cuda}).")
    return [ext], {"build_ext": TolerantBuildExtension.with_options(use_ninja=True)}
