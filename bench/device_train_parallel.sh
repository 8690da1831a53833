#!/usr/bin/env bash
# On a 2-GPU machine (device tool, kind nvidia-h200-x2): the parallel trainer itself, as users
# launch it (torchrun; DeepSpeed ZeRO-1 over megatron-core's groups; NCCL), on the
# quickstart data beside one GPU. MODEL (130m or 1.3b; ngroups 2 so that TP splits groups),
# STEPS steps a run, and the runs named in RUNS:
#   one     one GPU                       dp2, tp2, cp2   two GPUs in that layout
#   tp2o    TP=2 with sequence parallelism and parallel.tp_comm_overlap
#   resume  DP=2 for STEPS, then a second launch resumes its sharded checkpoint for STEPS/2 more
#   NAME-graph  the same run with train.cuda_graph=true (one-graph: one GPU, graphed)
# bench/train_parallel_report.py then prints tokens/s per GPU against one GPU from the runs'
# metrics.jsonl and writes bench/results/train-parallel-<gpu>-<model>.json.
#   carry: .devwheels (megatron-core, DeepSpeed 0.19.8's pure-Python wheel and its deps, …, for
#          Python 3.12: ../shared/GPU.md), data/quickstart
#   usage: MODEL=1.3b STEPS=12 RUNS="one tp2 cp2 one-graph tp2-graph" bash bench/device_train_parallel.sh
#          GRAD_ACCUM=4 MODEL=1.3b STEPS=12 RUNS="one-graph tp2o-graph" bash bench/device_train_parallel.sh
set -uo pipefail
source bench/device_env.sh
export TORCH_CUDA_ARCH_LIST=9.0   # DeepSpeed's op builder cannot parse the image's 9.0a (GPU.md)
MODEL=${MODEL:-130m} STEPS=${STEPS:-20} RUNS=${RUNS:-one dp2 tp2 cp2 resume}
quick="data.train_prefix=data/quickstart/train data.valid_prefix=data/quickstart/valid"
quick="$quick data.tokenizer=data/quickstart/tokenizer.model logging.tensorboard=false"
common="configs/$MODEL.yaml model.ngroups=2 train.grad_accum=${GRAD_ACCUM:-1} optim.warmup_steps=5 train.eval_every=0"
common="$common train.eval_batches=4 logging.log_every=5 checkpoint.every=0 $quick"
train1="python3 -m mamba_train.cli train"
train2="torchrun --standalone --nproc-per-node 2 -m mamba_train.cli train"
status=0
run() {   # run name, log name, seconds, command...: metrics and checkpoints in $OUT/run, /tmp/ckpt-run
  local name=$1 log=$2 limit=$3; shift 3
  timeout "$limit" "$@" logging.run_dir="$OUT/$name" checkpoint.dir="/tmp/ckpt-$name" > "$OUT/$log.log" 2>&1
  local rc=$?
  echo "== $log: exit $rc"; grep -E "step +[0-9]+/|eval|resumed|Error|error" "$OUT/$log.log" | tail -4
  [ $rc -eq 0 ] || status=1
}
names=()
for r in $RUNS; do
  rm -rf "/tmp/ckpt-$r" "$OUT/$r"   # a run starts afresh (a warm machine keeps the last call's)
  graph=train.cuda_graph=false; [[ $r == *-graph ]] && graph=train.cuda_graph=true
  case ${r%-graph} in
    one) run $r $r 240 $train1 $common train.steps=$STEPS $graph; names+=($r) ;;
    dp2) run $r $r 180 $train2 $common train.steps=$STEPS $graph; names+=($r) ;;
    tp2) run $r $r 180 $train2 $common train.steps=$STEPS parallel.tp=2 $graph; names+=($r) ;;
    tp2o) run $r $r 180 $train2 $common train.steps=$STEPS parallel.tp=2 parallel.sequence_parallel=true \
              parallel.tp_comm_overlap=true $graph; names+=($r) ;;
    cp2) run $r $r 180 $train2 $common train.steps=$STEPS parallel.cp=2 $graph; names+=($r) ;;
    resume) run resume resume 180 $train2 $common train.steps=$STEPS
            run resume resume-2 150 $train2 $common train.steps=$((STEPS + STEPS / 2)) --resume auto ;;
    *) echo "unknown run $r"; status=1 ;;
  esac
done
# the report compares with the one-GPU runs: RUNS must start with `one` or `one-graph`
if [ ${#names[@]} -gt 1 ] && [ "${names[0]%-graph}" = one ]; then
  python3 bench/train_parallel_report.py "$OUT" one "${names[@]:1}" --model "$MODEL" | tee "$OUT/report.txt" || status=1
fi
send_back "train-parallel-*.json"
exit $status
