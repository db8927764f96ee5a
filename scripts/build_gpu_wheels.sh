#!/usr/bin/env bash
# Build the wheels that travel to a lent GPU machine (Python 3.12, torch + triton only, no network)
# into .whl/ (git-ignored; never commit it). bench/gpu_check.sh installs them there with --no-index.
#
#     bash scripts/build_gpu_wheels.sh [OUT_DIR]        # default .whl; ~50 MB, ~1 minute
#
# mamba-ssm is built here without CUDA (its Triton kernels are pure Python; the CUDA extensions are
# not needed by our call sites) and deepspeed as a pure-Python wheel (no ops compiled); everything
# else is downloaded as cp312 manylinux or pure-Python wheels, with their dependencies, except torch
# and triton, which the GPU machine has. Versions are pinned to the ones tested here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-.whl}"
PY_VERSION="${GPU_PYTHON_VERSION:-3.12}"
ABI="cp${PY_VERSION/./}"
mkdir -p "$OUT"
export PIP_DISABLE_PIP_VERSION_CHECK=1

MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
    pip wheel --no-deps --no-build-isolation -w "$OUT" "mamba-ssm==2.3.2.post1"
pip wheel --no-deps -w "$OUT" "deepspeed==0.19.8"
# deepspeed's requirements minus torch, transformers and what bench_train and the tests import.
pip download -d "$OUT" --only-binary=:all: --python-version "$PY_VERSION" --implementation cp --abi "$ABI" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    einops hjson msgpack ninja numpy packaging psutil py-cpuinfo "pydantic>=2" tqdm \
    "transformers==5.24.0" jinja2 pyyaml safetensors webdataset pytest
ls -1 "$OUT" | sed 's/^/  /'
du -sh "$OUT"
