#!/usr/bin/env bash
# On the GPU machine: one bench script run in this tree and in another tree beside it, in the
# order given, so that both sides' figures come from one machine (cards differ by a few
# percent between calls). Each run gets PARALLEL_TAG=-SIDE-N, which device_parallel.sh puts
# in its log's and JSON's names in $OUT.
#   first, here: mkdir -p .baseline/NAME && git archive REV | tar -x -C .baseline/NAME
#   then on the device (carry .baseline, .devwheels, .anchor):
#     bash bench/device_ab.sh .baseline/NAME "this other this other" bench/device_parallel.sh tp:2048:1:graph
set -uo pipefail
other=$1 order=$2
shift 2
for carried in .devwheels .anchor; do   # the other tree runs with this tree's carried folders
  [ -e "$carried" ] && [ ! -e "$other/$carried" ] && ln -s "$PWD/$carried" "$other/$carried"
done
run=0
for side in $order; do
  run=$((run + 1))
  case $side in
    this) dir=. ;;
    other) dir=$other ;;
    *) echo "device_ab.sh: a side is 'this' or 'other', found '$side'" >&2; exit 2 ;;
  esac
  echo "## $side ($dir), run $run: $*"
  (cd "$dir" && PARALLEL_TAG="-$side-$run" bash "$@")
done
