# Sourced by every bench/device_*.sh, from the repo root on the GPU machine: the environment a
# run there needs. Carried folders: .devwheels (Python 3.12 wheels the image lacks: megatron-core,
# pyyaml, tqdm, zstandard, einops), .anchor (mamba_ssm's sources, einops, pytest).
export PYTHONUNBUFFERED=1
# NVLink multicast off in every process (the device library's KINDS.md says why)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT="${OUT:-/tmp/device_out}"
mkdir -p "$OUT"
if compgen -G ".devwheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .devwheels/*.whl
fi
export PYTHONPATH="$PWD/.anchor:$PWD:/tmp/site"
# every results file names its GPU: this line goes into the call's $OUT too
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# send_back PATTERN: the results files (bench/results/PATTERN) written since this script was
# sourced into $OUT; at most 8 files come back from a call, so not the committed ones beside them
send_back() { find bench/results -maxdepth 1 -name "$1" -newer "$OUT/gpu.txt" -exec cp {} "$OUT/" \; ; }
