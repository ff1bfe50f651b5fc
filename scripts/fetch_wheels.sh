#!/usr/bin/env bash
# Downloads into wheels/ (git-ignored) the wheels the bare, offline GPU image lacks, for scripts/gpucheck.py and
# scripts/gpulease.py to install there (`--wheels`, default wheels/): hydra-core, omegaconf and its parser runtime,
# bitsandbytes, and AirLLM 4.0 (an optional extra: without its wheel the lease skips the AirLLM runs). Every other
# package they import (torch, transformers, accelerate, safetensors, scipy, sentencepiece, ...) is in the image.
#
#   scripts/fetch_wheels.sh [DEST]     # run here, where PyPI is reachable; DEST defaults to wheels/
#
# The image's Python is 3.12 on x86-64 Linux (PYTHON_VERSION overrides it); these wheels are pure Python or
# manylinux.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-wheels}
python=${PYTHON:-python3}
mkdir -p "$dest"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 any; do
    platforms+=(--platform "$p")
done
"$python" -m pip download --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --implementation cp "${platforms[@]}" -d "$dest" \
    bitsandbytes==0.50.2 hydra-core==1.3.8 omegaconf==2.3.1 airllm==4.0.0
# omegaconf's and hydra's ANTLR runtime is published as a source archive only: built here into a pure-Python wheel.
"$python" -m pip wheel --no-deps -w "$dest" antlr4-python3-runtime==4.9.3
ls -l "$dest"
