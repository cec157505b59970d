#!/usr/bin/env bash
# GPU session (one device call): the arithmetic floor of the scan kernels (bench/scan_compute_floor.cu, no torch)
# into $OUT/compute_floor.json, then, unless FLOOR_ONLY=1, the real kernels' per-kernel CUDA times at the same
# shape on the same card (bench/profile_scan.py --kernels) into $OUT/profile_kernels.txt.
#   OUT=$OUT bash bench/gpu_compute_floor.sh
source bench/gpu_session_env.sh
nvcc -O3 -std=c++17 --use_fast_math --expt-relaxed-constexpr -arch=sm_90 -o /tmp/scan_floor \
  bench/scan_compute_floor.cu mamba/csrc/selective_scan_fwd.cu || exit 1
/tmp/scan_floor > "$OUT/compute_floor.json"; echo "floor rc $?"
cat "$OUT/compute_floor.json"
if [ "${FLOOR_ONLY:-0}" = 1 ]; then exit 0; fi
build_extensions
timeout 120 python bench/profile_scan.py --kernels > "$OUT/profile_kernels.txt" 2>&1
print_scan_profile "$OUT/profile_kernels.txt"
/tmp/scan_floor > "$OUT/compute_floor_after.json"; echo "floor (again, after the profile) rc $?"
grep -A3 floor_ms "$OUT/compute_floor_after.json"
echo "end after $(( $(date +%s) - start )) s"
