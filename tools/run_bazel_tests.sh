#!/usr/bin/env bash
# Builds and tests the project with Bazel, offline, as CI does (.ci/run).
#
#   tools/run_bazel_tests.sh [extra bazel test flags]
#
# Installs Debian's bazel-bootstrap (Bazel 4.2.3, ~40 MB) with apt if `bazel`
# is missing, runs `bazel test --config=ci //...` (the pytest fast subset:
# not slow, not multiprocess), then stops the Bazel server (~270 MB resident).
# Python is $BAZEL_PYTHON, else .venv/bin/python (made here with `make venv`
# if missing), else python3 on PATH: see tools/python_toolchain.bzl.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

if ! command -v bazel >/dev/null 2>&1; then
  echo "run_bazel_tests: bazel not found; installing Debian's bazel-bootstrap" >&2
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  if ! "${sudo[@]}" apt-get install -y -q bazel-bootstrap; then
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q bazel-bootstrap
  fi
  echo "run_bazel_tests: installed in $((SECONDS - start)) s" >&2
fi

if [ -z "${BAZEL_PYTHON:-}" ] && [ ! -x .venv/bin/python ]; then
  make venv
fi

status=0
bazel test --config=ci //... "$@" || status=$?
bazel shutdown || true
echo "run_bazel_tests: exit ${status} after $((SECONDS - start)) s" >&2
exit "${status}"
