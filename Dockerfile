# syntax=docker/dockerfile:1
# The worker's GPU image: vLLM 0.32 (CUDA 13 build: torch 2.13.0 and the nvidia-* 13.x wheels),
# LMCache 0.5.6 (built for CUDA 13: cupy-cuda13x, cuda-python 13), runpod 1.10, the handler package.
# The CUDA user-space libraries come with those wheels; the base image matches their CUDA 13.0 and
# brings the driver hooks. Python is Ubuntu 24.04's 3.12.
#
#   docker build -t USER/worker-vllm-lmcache:0.1 \
#     --build-arg MODEL_NAME=Qwen/Qwen3-8B [--build-arg MODEL_REVISION=main] \
#     [--secret id=hf_token,env=HF_TOKEN] .
#
# Without MODEL_NAME nothing is baked in: the worker uses RunPod's model cache, or downloads the
# model named by its MODEL_NAME setting at cold start.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    LMCACHE_TRACK_USAGE=false \
    HF_HUB_DISABLE_TELEMETRY=1

# Ubuntu's python3.12 packages are not pinned: the archive keeps only the latest security release
# of each, so a pinned version stops building when the next one lands; the base image tag fixes
# the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv

WORKDIR /app
# Every version is pinned in requirements.txt (vllm pins torch and the CUDA wheels); pip
# compiles their bytecode as it installs them, so imports at cold start read .pyc files.
COPY requirements.txt .
RUN pip install -r requirements.txt

# The model, baked at build time (before the code, so a code change keeps this layer). The token
# is a build secret: mounted for this one command, never stored in a layer.
ARG MODEL_NAME=""
ARG MODEL_REVISION=""
# DL3064 reads "TOKEN" in TOKENIZER_NAME as a credential; it is a repository name.
# hadolint ignore=DL3064
ARG TOKENIZER_NAME=""
ARG BASE_PATH=/models
ENV BASE_PATH=${BASE_PATH}
COPY builder/download_model.py builder/
RUN --mount=type=secret,id=hf_token python builder/download_model.py

# What the worker serves unless the endpoint's settings say otherwise: the baked model, if any.
# hadolint ignore=DL3064
ENV MODEL_NAME=${MODEL_NAME:-HuggingFaceTB/SmolLM2-135M-Instruct} \
    MODEL_REVISION=${MODEL_REVISION} \
    TOKENIZER_NAME=${TOKENIZER_NAME}

COPY handler/ handler/
COPY test_input.json .
RUN python -m compileall -q handler

CMD ["python", "-m", "handler"]
