#!/usr/bin/env bash
# GPU session (one device call) comparing compile-time variants of the scan kernels: for each space-separated
# entry of DEFINES (comma-joined nvcc -D flags, e.g. DEFINES="default MY_SWITCH=1 MY_SWITCH=2,OTHER=0", for
# switches the kernel sources read with #ifndef ... #define defaults),
# rebuilds the scan extension with those flags (NVCC_APPEND_FLAGS, a fresh build directory) and writes the
# per-kernel CUDA times of bench/profile_scan.py --kernels to $OUT/profile_<entry>.txt, printing the lane-walk
# and backward-kernel rows; the entry "default" profiles the build as it is (no flags, not rebuilt). TESTS=1 also
# runs tests/test_cuda_kernels.py on each build (TESTS=changed: on each build but the default); DSTATES="64"
# also profiles each build at those d_state values.
#   OUT=$OUT DEFINES="..." bash bench/gpu_define_sweep.sh
source bench/gpu_session_env.sh
build_extensions
clean_scan_build() { rm -rf mamba/build mamba/mamba_ssm/_selective_scan_cuda*.so; }
variant_built=0
for d in ${DEFINES:-}; do
  if [ "$d" != default ]; then
    flags=""
    for f in ${d//,/ }; do flags="$flags -D$f"; done
    clean_scan_build
    variant_built=1
    NVCC_APPEND_FLAGS="$flags" python -m pip install -q --no-build-isolation --no-deps -e ./mamba \
      > "$OUT/build_${d//[=,]/_}.log" 2>&1 || { echo "build with$flags failed"; tail -5 "$OUT/build_${d//[=,]/_}.log"; continue; }
    echo "built with$flags after $(( $(date +%s) - start )) s"
  fi
  echo "$d:"
  if [ "${TESTS:-0}" != 0 ] && { [ "$d" != default ] || [ "${TESTS}" != changed ]; }; then
    timeout ${TEST_TIMEOUT:-240} python -m pytest -q -p no:cacheprovider --tb=short -x tests/test_cuda_kernels.py \
      > "$OUT/tests_${d//[=,]/_}.txt" 2>&1
    echo "  tests: $(grep -E 'passed|failed' "$OUT/tests_${d//[=,]/_}.txt" | tail -1)"
  fi
  timeout 90 python bench/profile_scan.py --kernels > "$OUT/profile_${d//[=,]/_}.txt" 2>&1
  print_scan_profile "$OUT/profile_${d//[=,]/_}.txt"
  for n in ${DSTATES:-}; do  # the per-kernel table at other d_state values as well
    timeout 120 python bench/profile_scan.py --kernels --dstate $n > "$OUT/profile_${d//[=,]/_}_n$n.txt" 2>&1
    print_scan_profile "$OUT/profile_${d//[=,]/_}_n$n.txt"
  done
done
# A later call on this (still warm) machine must not take the last variant build for the tree's: build_extensions
# keeps an existing build.
if [ "$variant_built" = 1 ]; then clean_scan_build; fi
echo "end after $(( $(date +%s) - start )) s"
