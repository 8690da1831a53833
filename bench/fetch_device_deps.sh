#!/usr/bin/env bash
# Run here (a machine with a package registry), from the repo root, in the dev venv: fetches what
# the offline GPU machine lacks into the ignored folders the device_*.sh scripts expect
# (../shared/GPU.md says why each is needed):
#   .devwheels/   Python 3.12 wheels: megatron-core and its deps, DeepSpeed (pure Python; its ops
#                 JIT-build there), pyyaml, tqdm, zstandard, sentencepiece, safetensors, einops
#   .anchor/      mamba_ssm 2.3.2.post1's Python sources (its __init__ a version line), a stub
#                 huggingface_hub, einops and pytest unpacked: put on PYTHONPATH as they are
#   .anchor-src/  causal_conv1d 1.6.2.post1's sdist (the anchor's fused path builds it there), and
#                 the wheel built from it once bench/join_device_wheel.sh has put it there
# Usage: bash bench/fetch_device_deps.sh        (about a minute; idempotent: rebuilds all three)
set -euo pipefail
PY="${PYTHON:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp312=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

# a causal_conv1d wheel built on the GPU machine (bench/join_device_wheel.sh) is kept: it
# takes a device call of about 8 minutes to build again
kept="$(mktemp -d)"
mv .anchor-src/causal_conv1d-*.whl "$kept"/ 2>/dev/null || true
rm -rf .devwheels .anchor .anchor-src
"$PY" -m pip download -q "${cp312[@]}" -d .devwheels \
  megatron-core==0.16.1 hjson msgpack py-cpuinfo pydantic pydantic-core annotated-types \
  typing-inspection typing-extensions einops pyyaml tqdm zstandard sentencepiece safetensors
# DeepSpeed publishes no wheel: a pure-Python one (needs torch in this venv to build)
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .devwheels deepspeed==0.19.8

# mamba_ssm's sdist imports CUDA extensions from its __init__; the Triton ops need none of them
MAMBA_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download -q --no-deps --no-build-isolation -d "$tmp" \
  mamba-ssm==2.3.2.post1
mkdir -p .anchor
tar -xzf "$tmp"/mamba_ssm-2.3.2.post1.tar.gz -C "$tmp"
cp -r "$tmp"/mamba_ssm-2.3.2.post1/mamba_ssm .anchor/
echo '__version__ = "2.3.2.post1"' > .anchor/mamba_ssm/__init__.py
# mamba_ssm.modules.mamba2 imports PyTorchModelHubMixin; a benchmark needs nothing from it
mkdir -p .anchor/huggingface_hub
echo 'class PyTorchModelHubMixin: pass' > .anchor/huggingface_hub/__init__.py
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp/whl" \
  einops pytest iniconfig pluggy packaging
for wheel in "$tmp"/whl/*.whl; do "$PY" -m zipfile -e "$wheel" .anchor/; done

CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE "$PY" -m pip download -q --no-deps --no-build-isolation \
  --no-binary :all: -d .anchor-src causal-conv1d==1.6.2.post1
mv "$kept"/*.whl .anchor-src/ 2>/dev/null || true
rmdir "$kept"
du -sh .devwheels .anchor .anchor-src
