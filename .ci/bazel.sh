#!/usr/bin/env bash
# CI: builds the CUDA library with Bazel, offline, using Debian's bazel-bootstrap (Bazel 4.2.3),
# and runs the smoke test that loads it into jevo. CI has nvcc but no GPU, so the test checks that
# jevo loads the Bazel-built library and registers its FFI targets, not the kernels' results.
#
# Only sm_90a is compiled (--config=sm90), which halves the compile time; the default build
# (sm_80 and sm_90a) uses the same rules and flags.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v bazel >/dev/null 2>&1; then
  sudo=()
  if [[ "$(id -u)" -ne 0 ]]; then sudo=(sudo); fi
  echo "+ apt-get install bazel-bootstrap"
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q bazel-bootstrap
fi

# The interpreter that the other CI steps use; the build takes its jaxlib FFI, CUTLASS, pybind11
# and Python headers from it, and the test imports jevo with it.
python="$(command -v python || command -v python3)"
export PYTHON_BIN_PATH="$python"

# The CUDA build's requirements and the runtime requirements named in pyproject.toml (the
# CMake front end, scikit-build-core, is not needed).
mapfile -t requirements < <("$python" - <<'EOF'
try:
  import tomllib
except ImportError:  # Python 3.10
  import tomli as tomllib

with open("pyproject.toml", "rb") as f:
  project = tomllib.load(f)
for req in project["tool"]["jevo"]["cuda-build-requires"] + project["project"]["dependencies"]:
  print(req)
EOF
)
echo "+ pip install ${requirements[*]}"
"$python" -m pip install -q "${requirements[@]}"

# Leave no Bazel server running after CI.
trap 'bazel shutdown >/dev/null 2>&1 || true' EXIT

start=$SECONDS
echo "+ bazel/offline.sh build --config=sm90 //:jevo_cuda"
bazel/offline.sh build --config=sm90 //:jevo_cuda
echo "bazel build: $((SECONDS - start)) s"

echo "+ bazel/offline.sh test --config=sm90 //:jevo_cuda_smoke_test"
bazel/offline.sh test --config=sm90 --test_output=all //:jevo_cuda_smoke_test
