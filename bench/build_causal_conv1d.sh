#!/usr/bin/env bash
# On the GPU machine: build the causal_conv1d 1.6.2.post1 CUDA extension (the anchor's fused
# path in bench/bench_train.py) for sm_90 only, as a wheel in $1 (default $OUT/wheels); 5 to 8
# minutes on 16 cores. `bash bench/device_train.sh anchor-fused` calls it and sends the wheel
# (25.5 MB) back in parts; bench/join_device_wheel.sh puts it in .anchor-src for later calls.
#   here, once: bash bench/fetch_device_deps.sh (puts the sdist in .anchor-src)
#   carry: .anchor-src (the sdist)
set -euo pipefail
dest="${1:-${OUT:-/tmp}/wheels}"
mkdir -p "$dest" /tmp/cc1d
tar xzf .anchor-src/causal_conv1d-1.6.2.post1.tar.gz -C /tmp/cc1d
cd /tmp/cc1d/causal_conv1d-1.6.2.post1
# setup.py compiles for every architecture nvcc knows; the H100 needs sm_90 alone
python3 - <<'PY'
import re, pathlib
setup = pathlib.Path("setup.py")
text = setup.read_text()
marker = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
assert marker in text, "setup.py changed: find where cc_flag is complete"
setup.write_text(text.replace(marker, '    cc_flag = [f for f in cc_flag if not f.startswith(("-gencode", "arch="))]\n'
                              '    cc_flag += ["-gencode", "arch=compute_90,code=sm_90"]\n' + marker, 1))
PY
export CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="${MAX_JOBS:-16}"
time python3 -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$dest" .
ls -la "$dest"
