#!/usr/bin/env bash
# On a 2-GPU machine (device tool, kind nvidia-h100-x2 / nvidia-h200-x2): TP, CP and DP
# efficiency of the 1.3b shape (ngroups 2 so TP=2 splits groups) against one GPU.
#   carry: .devwheels (megatron-core 0.16.1, einops, zstandard, pyyaml, tqdm for Python 3.12)
#   usage: bash bench/device_parallel.sh [mode:seqlen[:accum][:graph] ...]   (default: the issue's runs)
#          PARALLEL_ARGS=--sequence-parallel PARALLEL_TAG=-sp bash bench/device_parallel.sh tp:2048:1:graph
#          PARALLEL_ARGS="--sequence-parallel --tp-comm-overlap" bash bench/device_parallel.sh tp:2048:1:graph
set -euo pipefail
source bench/device_env.sh
nvidia-smi topo -m   # NVLink or PCIe between the two GPUs: what TP and CP efficiency can reach
runs=("$@")
# PARALLEL_ARGS: more bench_parallel flags, e.g. "--sequence-parallel"; PARALLEL_TAG: a suffix
# for this call's log and JSON in $OUT, so that two calls' results both come back
python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench/bench_parallel.py ${PARALLEL_ARGS:-} \
    --config configs/1.3b.yaml model.ngroups=2 model.vocab_size=50277 ${runs:+--runs "${runs[@]}"} 2>&1 \
    | tee "$OUT/parallel${PARALLEL_TAG:-}.log"
# only the file this run wrote (a call brings back at most 8 files: not the committed ones beside it)
for f in $(find bench/results -maxdepth 1 -name 'parallel-*.json' -newer "$OUT/gpu.txt"); do
  cp "$f" "$OUT/$(basename "$f" .json)${PARALLEL_TAG:-}.json"
done
