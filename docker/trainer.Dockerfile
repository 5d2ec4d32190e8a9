# syntax=docker/dockerfile:1
# The CUDA image for `cpt train` / `cpt eval` (one GPU, torchrun DDP/FSDP2, Slurm, Kubernetes). No Beam in it.
#
# Build from the repository root (Docker cannot build on the cpt dev machines; `make lint` only lints this file):
#   docker build -f docker/trainer.Dockerfile -t cpt-trainer:0.1.0 .
# Run (needs the NVIDIA Container Toolkit on the host):
#   docker run --rm --gpus all --ipc=host -v "$PWD/runs:/runs" cpt-trainer:0.1.0 train --config /runs/RUN.yaml
#
# Why python:3.11-slim and not an nvidia/cuda base: the torch wheel on PyPI is itself the CUDA build and carries
# its CUDA runtime, cuDNN, cuBLAS and NCCL (torch 2.13.0 on PyPI: CUDA 13.0, host driver >= 580). The container
# only needs the host driver, which the NVIDIA Container Toolkit mounts in when the two variables below are set
# (they are what nvidia/cuda images set). This keeps Python 3.11, the version the pins are tested with.
# Hosts with a driver older than 580: a CUDA 12 index, e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# (PyTorch's install matrix lists the CUDA variants that each torch release has).
FROM python:3.11-slim-bookworm

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://pypi.org/simple"

ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# DL3013 cannot see through the ARG: its default above is an exact pin (checked against the Makefile's TORCH).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/cpt
COPY setup.py pyproject.toml README.md ./
COPY shared/ shared/
COPY trainer/ trainer/
# setup.py maps all three folders to cpt.*; the pipeline sources come along but Beam does not (no `pipeline` extra).
COPY pipelines/ pipelines/
# `train` is torch's side only; `remote` adds gcsfs/s3fs so sources and eval sets can be gs:// or s3:// URLs.
# The last line proves the image is sdpa-ready: torch's fused attention (flash, memory-efficient) is compiled in;
# it runs on the GPU when the model is loaded with attn_implementation="sdpa" (transformers' default).
# DL3013 wants `pkg==version`: this installs the checkout itself, whose dependencies setup.py pins exactly.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[train,remote]" \
    && pip check \
    && python -c "import importlib.util as u, torch; assert u.find_spec('apache_beam') is None; \
assert torch.backends.cuda.is_flash_attention_available(), 'torch build lacks flash sdpa'; print(torch.__version__)"

# Run as an unprivileged user; pass --user "$(id -u):$(id -g)" when a mounted output folder needs your own uid.
RUN useradd --create-home --uid 1000 cpt
USER 1000
WORKDIR /home/cpt

ENTRYPOINT ["cpt"]
CMD ["--help"]
