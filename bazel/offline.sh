#!/usr/bin/env bash
# Runs Bazel without network access, for Debian's bazel-bootstrap (Bazel 4.2.3):
#
#   bazel/offline.sh build //:jevo_cuda
#   bazel/offline.sh test //:jevo_cuda_smoke_test
#   bazel/offline.sh build --config=sm90 //:jevo_cuda      # any other Bazel flags as usual
#
# Bazel's built-in WORKSPACE suffix declares rules_cc, rules_java, rules_proto and
# remote_coverage_tools as downloads. Building //:jevo_cuda needs none of them, but the test runner
# and @bazel_tools load rules_cc and remote_coverage_tools. This script points those repositories
# at local copies: the stand-ins in bazel/offline/ (Debian's bazel-rules-cc is a release too new
# for Bazel 4.2.3) and, where installed, Debian's bazel-rules-java and bazel-rules-proto.
# --override_repository takes absolute paths only and .bazelrc cannot expand the workspace's path
# there, hence a script; the other offline flags are in .bazelrc under --config=offline.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bazel="${BAZEL:-bazel}"
if ! command -v "$bazel" >/dev/null 2>&1; then
  echo "bazel/offline.sh: '$bazel' not found; on Debian: apt-get install bazel-bootstrap" >&2
  exit 1
fi

overrides=(
  "--override_repository=rules_cc=$root/bazel/offline/rules_cc"
  "--override_repository=remote_coverage_tools=$root/bazel/offline/remote_coverage_tools"
)
debian_rules=/usr/share/bazel/rules
for name in java proto; do
  if [[ -d "$debian_rules/$name" ]]; then
    overrides+=("--override_repository=rules_$name=$debian_rules/$name")
  fi
done

# Startup options (before the command) stay in front; build options go after the command, for the
# commands that take them.
startup=()
while [[ $# -gt 0 && "$1" == -* ]]; do
  startup+=("$1")
  shift
done
if [[ $# -eq 0 ]]; then
  echo "usage: bazel/offline.sh [startup options] <command> [options] [targets]" >&2
  exit 2
fi
command="$1"
shift
case "$command" in
  build | test | run | coverage | query | cquery | aquery | fetch | sync | info | clean | print_action)
    exec "$bazel" "${startup[@]}" "$command" --config=offline "${overrides[@]}" "$@"
    ;;
  *)
    exec "$bazel" "${startup[@]}" "$command" "$@"
    ;;
esac
