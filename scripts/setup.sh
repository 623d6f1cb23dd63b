#!/usr/bin/env bash
# Sets up a fresh Debian machine (as root): system packages, then .venv with this package.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# chromium: the tests render the HTML report headless and check every figure shows.
apt_packages=(dataset-fashion-mnist qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu chromium)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch==2.13.0 first: that exact pin resolves to the CPU build on this machine.
.venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# nvcc for CUDA builds: the machine's, else NVIDIA's wheels (nvvm pinned to the same release).
if ! command -v nvcc >/dev/null 2>&1; then
  .venv/bin/pip install -q --disable-pip-version-check nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88
fi
# aarch64 TVM runtime + qemu runner for validating ARM builds on this x86 host, and onnxruntime's
# own aarch64 build to compare against (each part skips itself when already in place).
.venv/bin/python -m clicktrain_deploy.compile.arm
