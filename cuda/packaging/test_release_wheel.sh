#!/bin/bash
# Builds the release wheel (kernels for sm_80 and sm_90a), installs it with no source tree beside
# it, and runs the GPU tests against that install, one test file at a time so that a file that
# fails or runs long does not hide the others. Run from the repository root on a machine with
# nvcc and a GPU:
#   bash cuda/packaging/test_release_wheel.sh [WORK_DIR]     (default: /tmp/jevo-wheel-test)
# Results: WORK_DIR/results.txt, one line per test file, and WORK_DIR/<file>.log.
# Options (environment): TEST_FILES, the test files to run (default: all the GPU ones below);
# PER_FILE_TIMEOUT, seconds per file (300); DEADLINE_S, seconds after the start by which every
# test file has ended (the last one is stopped there; none by default); REUSE=1, test the wheel a previous run installed in WORK_DIR instead of
# building one (results are appended).
set -uo pipefail
work=${1:-/tmp/jevo-wheel-test}
per_file_timeout=${PER_FILE_TIMEOUT:-300}
deadline=${DEADLINE_S:-0}
start=$SECONDS
if [[ "${REUSE:-0}" != 1 ]]; then
  rm -rf "$work" && mkdir -p "$work/whl" "$work/site" "$work/run"
  JEVO_CUDA_ARCHS="80;90a" python3 -m pip wheel . --no-deps --no-build-isolation --no-index \
    -w "$work/whl" -Cbuild-dir=build/release >"$work/build.log" 2>&1 ||
    { echo "wheel build failed; see $work/build.log"; tail -20 "$work/build.log"; exit 1; }
  echo "wheel built in $((SECONDS - start)) s: $(ls "$work/whl")"
  python3 -m pip install -q --no-deps --target "$work/site" "$work"/whl/jevo-*.whl || exit 1
  cp -r tests "$work/run/tests"
  : >"$work/results.txt"
fi
cd "$work/run" || exit 1
export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import jevo, sys; print('jevo from', jevo.__file__); print(jevo.cuda_status())
sys.exit(0 if jevo.__file__.startswith('$work/site') else 1)" || { echo "jevo is not the wheel's"; exit 1; }
files=${TEST_FILES:-"tests/test_cuda_attention.py tests/test_cuda_peaked_softmax.py tests/test_cuda_forward_memory.py
  tests/test_cuda_lib.py tests/test_cuda_partitioning.py tests/test_export.py tests/test_nn_block.py tests/test_shard_map.py
  tests/test_deterministic.py tests/test_transition_pallas.py"}
for file in $files; do
  name=$(basename "$file" .py)
  limit=$per_file_timeout
  if (( deadline > 0 )); then
    (( deadline - (SECONDS - start) < limit )) && limit=$((deadline - (SECONDS - start)))
    if (( limit < 20 )); then
      echo "$name: not run (the $deadline s deadline)" | tee -a "$work/results.txt"
      continue
    fi
  fi
  timeout "$limit" python3 -m pytest -q -rs -p no:cacheprovider "$file" >"$work/$name.log" 2>&1
  echo "$name: rc=$? $(tail -1 "$work/$name.log")" | tee -a "$work/results.txt"
done
