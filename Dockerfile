# mamba-train on NVIDIA's PyTorch image (CUDA, NCCL and apex inside).
#   docker build -t mamba-train .
#   docker run --gpus all --ipc=host -v $PWD/data:/workspace/mamba-train/data mamba-train \
#       mamba-train train configs/130m.yaml
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /workspace/mamba-train
COPY pyproject.toml README.md ./
COPY mamba_train ./mamba_train
COPY kernels ./kernels
COPY configs ./configs
COPY data_prep ./data_prep
COPY launch ./launch

# Pin torch to the image's own build: its version is a pre-release (e.g. 2.9.0a0+…),
# which `torch>=2.6` alone would not accept, and pip would fetch another torch from PyPI.
# DeepSpeed builds its CUDA ops on first use; "9.0a" in the image's arch list breaks its
# op builder, so name the plain architectures.
ENV TORCH_CUDA_ARCH_LIST="8.0;9.0"
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-pin.txt \
 && pip install --no-cache-dir -c /tmp/torch-pin.txt -e ".[gpu]"

# Multicast over NVLink can take a shared host's GPUs out of service; keep it off.
ENV NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
CMD ["mamba-train", "--help"]
