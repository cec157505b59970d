# Sourced by the bench/gpu_*_session.sh scripts (run on the device machine from the repository root): $OUT,
# the build settings, MONAI etc. from carried wheels (.whl) and the import paths; prints the GPU's name, sets
# $start, and defines build_extensions (both packages built in parallel unless already built here).
set -uo pipefail
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -d .whl ]; then python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl; fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/mamba:$PWD/causal-conv1d
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s)

build_extensions() {
  if ls mamba/mamba_ssm/_selective_scan_cuda*.so causal-conv1d/causal_conv1d/_causal_conv1d_cuda*.so >/dev/null 2>&1; then
    return 0
  fi
  ( python -m pip install -q --no-build-isolation --no-deps -e ./causal-conv1d > "$OUT/build_conv.log" 2>&1 ) &
  ( python -m pip install -q --no-build-isolation --no-deps -e ./mamba > "$OUT/build_scan.log" 2>&1 ) &
  wait
  echo "built after $(( $(date +%s) - start )) s"
}

# Prints the scan kernels' rows (lane walks, backward main kernels, carries) of a bench/profile_scan.py --kernels
# output file and their sum per dtype.
print_scan_profile() {
  awk '/CUDA time per/ {if (n) print "    sum of the scan kernels", s; s = 0; n = 1; print; next}
       /lane|bwd_main|carry/ {s += $1; print} END {print "    sum of the scan kernels", s}' "$1"
}
