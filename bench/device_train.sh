#!/usr/bin/env bash
# On the GPU machine (device tool), from the repo root; carry .devwheels (pyyaml, tqdm, … for
# Python 3.12) and .anchor (mamba_ssm 2.3.2.post1 sources, einops); for `curves` also data/quickstart.
# Usage: bash bench/device_train.sh [anchor-fused | profile MODEL | cpu-profile MODEL | bench MODEL... | curves MODEL]...
#   anchor-fused        install causal_conv1d so that `bench` also times the anchor's fused path: the
#                       wheel carried in .anchor-src if there is one, else built for sm_90 from the
#                       sdist there (3 to 8 minutes: a call of its own) and sent back in $OUT in parts
#   profile 130m        CUDA time of one training step by kind, ours beside the anchor, and per kernel
#   cpu-profile 1.3b    cProfile of ours' eager step: the Python behind its launches
#   bench 130m 370m     bench/bench_train.py (ours beside the mamba_ssm-block LM) for those models
#   curves 130m         300-step loss curves of ours and the anchor on data/quickstart (issue 9: within 1%);
#                       CURVE_REPEATS=2: from two draws of the shared initial weights, their means compared
set -o pipefail
source bench/device_env.sh
status=0
while [ $# -gt 0 ]; do
  case "$1" in
    profile) python3 bench/bench_train.py --profile --models "$2" 2>&1 | tee -a "$OUT/train-profile.log" || status=1; shift 2 ;;
    cpu-profile) python3 bench/bench_train.py --cpu-profile --models "$2" > "$OUT/train-cpu-profile-$2.log" 2>&1 || status=1
                 head -60 "$OUT/train-cpu-profile-$2.log"; shift 2 ;;
    anchor-fused) if compgen -G ".anchor-src/causal_conv1d-*.whl" > /dev/null; then
                    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .anchor-src/causal_conv1d-*.whl || status=1
                  else
                    bash bench/build_causal_conv1d.sh /tmp/wheels > "$OUT/build-causal-conv1d.log" 2>&1 \
                      && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl \
                      || { status=1; tail -20 "$OUT/build-causal-conv1d.log"; }
                    # the wheel comes back in parts (a file back is at most 16 MiB): join them here with
                    # bench/join_device_wheel.sh, and later calls that carry .anchor-src skip the build
                    for w in /tmp/wheels/causal_conv1d-*.whl; do
                      [ -e "$w" ] && split -b 15M -d "$w" "$OUT/$(basename "$w").part-"
                    done
                  fi; shift ;;
    bench)   shift; models=(); while [ $# -gt 0 ] && [ "$1" != profile ] && [ "$1" != cpu-profile ] && [ "$1" != bench ] && [ "$1" != curves ]; do models+=("$1"); shift; done
             python3 bench/bench_train.py --graph --models "${models[@]}" 2>&1 | tee -a "$OUT/train-bench.log" || status=1
             send_back "train-*.json" ;;
    curves)  python3 bench/bench_train.py --curves --models "$2" --data data/quickstart/train \
               --tokenizer data/quickstart/tokenizer.model --curve-repeats "${CURVE_REPEATS:-1}" 2>&1 \
               | tee -a "$OUT/train-curves.log" || status=1
             send_back "train-curves-*.json"; shift 2 ;;
    *) echo "unknown step $1"; status=1; shift ;;
  esac
done
exit $status
