#!/usr/bin/env bash
# On a 2-GPU machine (device tool, kind nvidia-h100-x2 / nvidia-h200-x2): TP, CP and DP
# efficiency of the 1.3b shape (ngroups 2 so TP=2 splits groups) against one GPU.
#   carry: .devwheels (megatron-core 0.16.1, einops, zstandard, pyyaml, tqdm for Python 3.12)
#   usage: bash bench/device_parallel.sh [mode:seqlen[:accum][:graph] ...]   (default: the runs)
set -euo pipefail
source bench/device_env.sh
nvidia-smi topo -m   # NVLink or PCIe between the two GPUs: what TP and CP efficiency can reach
runs=("$@")
python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/bench_parallel.py \
    --config configs/1.3b.yaml model.ngroups=2 model.vocab_size=50277 ${runs:+--runs "${runs[@]}"} 2>&1 \
    | tee "$OUT/parallel.log"
cp bench/results/parallel-*.json "$OUT/" 2>/dev/null || true
