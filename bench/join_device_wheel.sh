#!/usr/bin/env bash
# Here, after a device call whose `anchor-fused` step built causal_conv1d (bench/device_train.sh):
# joins the wheel's parts from that call's files folder into .anchor-src, which later calls
# carry, so they install it in seconds instead of building it again.
# Usage: bash bench/join_device_wheel.sh FILES_AT
set -euo pipefail
files_at="$1"
for first in "$files_at"/causal_conv1d-*.whl.part-00; do
  wheel="$(basename "${first%.part-00}")"
  cat "$files_at/$wheel".part-* > ".anchor-src/$wheel"
  python3 -m zipfile -t ".anchor-src/$wheel" > /dev/null
  ls -la ".anchor-src/$wheel"
done
