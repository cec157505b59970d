"""Every CUDA source compiles with `nvcc -c -arch=sm_90` on a machine without a GPU or torch's CUDA build,
and every torch binding (.cpp) passes a syntax-only compile against the CPU wheel's headers.

The .cu files include CUDA headers and our own only (torch bindings live in the .cpp files), so a syntax or
template error is caught here in CI. Skipped when nvcc is not installed."""
import glob
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "mamba", "csrc", "*.cu"))
                 + glob.glob(os.path.join(ROOT, "causal-conv1d", "csrc", "*.cu")))
NVCC = shutil.which("nvcc")


def test_cuda_sources_exist():
    names = {os.path.basename(s) for s in SOURCES}
    assert {"selective_scan_fwd.cu", "selective_scan_bwd.cu", "causal_conv1d_kernels.cu"} <= names


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_for_sm90_without_torch(source, tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-arch=sm_90", "-O1", "--use_fast_math", "--expt-relaxed-constexpr",
           "-I", os.path.dirname(source), source, "-o", str(tmp_path / "k.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
    with open(source) as f:
        text = f.read()
    assert "torch/" not in text and "ATen/" not in text, "kernels must not include torch headers"


# The arithmetic-floor benchmark (bench/scan_compute_floor.cu) reuses the kernels' helper functions and
# bwd_main2_kernel's reductions; compiling it here keeps it in step with them.
FLOOR_BENCH = os.path.join(ROOT, "bench", "scan_compute_floor.cu")


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_compute_floor_benchmark_compiles_for_sm90(tmp_path):
    cmd = [NVCC, "-c", "-std=c++17", "-arch=sm_90", "-O1", "--use_fast_math", "--expt-relaxed-constexpr",
           FLOOR_BENCH, "-o", str(tmp_path / "floor.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"


# The torch bindings (.cpp) need torch's headers, which the CPU wheel ships (including ATen/cuda), and the CUDA
# runtime headers that come with nvcc. Five CUDA library headers that ATen/cuda includes (cuBLAS, cuBLASLt,
# cuSPARSE, two of cuSOLVER) are not part of a compiler-only CUDA install, and the CPU wheel lacks the generated
# c10/cuda/impl/cuda_cmake_macros.h; where they are missing, minimal stand-ins (the handle types ATen names; an
# empty macros file) are written to a temporary folder. A syntax-only compile then catches binding errors
# (argument checks, pybind11 signatures, Params fields) without a GPU.
BINDINGS = [os.path.join(ROOT, "mamba", "csrc", "selective_scan.cpp"),
            os.path.join(ROOT, "causal-conv1d", "csrc", "causal_conv1d.cpp")]
CXX = shutil.which("g++") or shutil.which("c++")
_STUBS = {
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;\n",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t;\n",
    "cusolver_common.h": "typedef int cusolverStatus_t;\n",
}


@pytest.mark.skipif(NVCC is None or CXX is None, reason="nvcc or a C++ compiler not installed")
@pytest.mark.parametrize("source", BINDINGS, ids=os.path.basename)
def test_torch_binding_compiles_syntax_only(source, tmp_path):
    import sysconfig

    from torch.utils.cpp_extension import include_paths
    candidates = [os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "include"),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "include"), "/usr/local/cuda/include"]
    cuda_inc = next((c for c in candidates if os.path.exists(os.path.join(c, "cuda_runtime.h"))), None)
    if cuda_inc is None:
        pytest.skip(f"no cuda_runtime.h in {candidates}")
    for name, text in _STUBS.items():
        if not os.path.exists(os.path.join(cuda_inc, name)):
            (tmp_path / name).write_text("#pragma once\n" + text)
    macros = os.path.join("c10", "cuda", "impl", "cuda_cmake_macros.h")
    if not any(os.path.exists(os.path.join(inc, macros)) for inc in include_paths()):
        (tmp_path / macros).parent.mkdir(parents=True)
        (tmp_path / macros).write_text("#pragma once\n")
    ext = os.path.splitext(os.path.basename(source))[0]
    cmd = [CXX, "-std=c++17", "-fsyntax-only", f"-DTORCH_EXTENSION_NAME=_{ext}_cuda", "-I", os.path.dirname(source),
           "-I", str(tmp_path), "-I", cuda_inc, "-I", sysconfig.get_paths()["include"]]
    for inc in include_paths():
        cmd += ["-I", inc]
    res = subprocess.run(cmd + [source], capture_output=True, text=True, timeout=600)
    errors = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert res.returncode == 0 and not errors, f"{' '.join(cmd)} {source}\n{res.stderr[-4000:]}"


# CUDA 12.x check (optional; the CI machine has CUDA 13 only). SEGMAMBA_CUDA12_ROOTS lists, separated by ':', folders
# into which the CUDA 12 wheels nvidia-cuda-nvcc-cu12 and nvidia-cuda-runtime-cu12 of one release were unzipped
# (README, CUDA kernels section). Those wheels carry CUDA 12's public headers and its ptxas, not its nvcc, so two
# checks stand in for a CUDA 12 build: (1) every .cu compiles to PTX for sm_80 and sm_90 with CUDA 12's
# cuda_runtime.h, cuda_fp16.h and cuda_bf16.h found first (an intrinsic or type that only CUDA 13 declares fails
# here); (2) that PTX, labelled with the newest PTX ISA that release supports, is accepted by
# its ptxas (an instruction that needs a newer PTX ISA or ptxas fails here).
CUDA12_ROOTS = [r for r in os.environ.get("SEGMAMBA_CUDA12_ROOTS", "").split(":") if r]
# Newest PTX ISA of each CUDA 12 minor release (CUDA's PTX ISA release notes).
_PTX_ISA = {0: "8.0", 1: "8.1", 2: "8.2", 3: "8.3", 4: "8.4", 5: "8.5", 6: "8.5", 8: "8.7", 9: "8.8"}


def _cuda12_tools(root):
    inc = os.path.join(root, "nvidia", "cuda_runtime", "include")
    ptxas = os.path.join(root, "nvidia", "cuda_nvcc", "bin", "ptxas")
    if not (os.path.exists(os.path.join(inc, "cuda_fp16.h")) and os.path.exists(ptxas)):
        pytest.fail(f"{root}: expected nvidia/cuda_runtime/include/cuda_fp16.h and nvidia/cuda_nvcc/bin/ptxas "
                    "(unzip nvidia-cuda-runtime-cu12 and nvidia-cuda-nvcc-cu12 there)")
    ver = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release 12\.(\d+)", ver)
    if m is None or int(m.group(1)) not in _PTX_ISA:
        pytest.fail(f"{ptxas}: not a known CUDA 12 release:\n{ver}")
    return inc, ptxas, int(m.group(1))


@pytest.mark.skipif(NVCC is None or not CUDA12_ROOTS, reason="nvcc or SEGMAMBA_CUDA12_ROOTS not set")
@pytest.mark.parametrize("root", CUDA12_ROOTS)
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_cuda_source_compiles_with_cuda12_headers_and_ptxas(root, source, tmp_path):
    inc, ptxas, minor = _cuda12_tools(root)
    spec = importlib.util.spec_from_file_location("_cuda_build", os.path.join(ROOT, "tools", "cuda_build.py"))
    cuda_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_build)
    common = [NVCC] + cuda_build.NVCC_FLAGS + ["-I", os.path.dirname(source)]  # the flags setup.py builds with
    for arch in ("80", "90"):
        # (1) PTX with CUDA 12's public headers ahead of this toolkit's (its crt/ internals stay, as they belong
        # to this nvcc); -H lists the headers included.
        ptx = tmp_path / f"k{arch}.ptx"
        cmd = common + ["-I", inc, f"-arch=sm_{arch}", "-Xcompiler", "-H", "-ptx", source, "-o", str(ptx)]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
        used = [ln for ln in res.stderr.splitlines() if ln.lstrip(". ").startswith(inc)]
        assert any(ln.endswith("cuda_fp16.h") for ln in used), "CUDA 12's cuda_fp16.h was not the one included"
        # (2) that PTX, labelled with the release's PTX ISA, assembled by CUDA 12's ptxas.
        lines = ptx.read_text().splitlines()
        idx = next(i for i, ln in enumerate(lines) if ln.startswith(".version "))
        lines[idx] = f".version {_PTX_ISA[minor]}"
        ptx.write_text("\n".join(lines) + "\n")
        cmd = [ptxas, f"-arch=sm_{arch}", "-O3", str(ptx), "-o", str(tmp_path / f"k{arch}.cubin")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert res.returncode == 0, f"CUDA 12.{minor} ptxas rejects {source} (sm_{arch}):\n{res.stderr[-4000:]}"
