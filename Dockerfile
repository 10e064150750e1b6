# GPU image for the worker. Minimal for now: issue 6 adds model baking (builder/), RunPod Hub files
# and a GPU smoke test. The CUDA vLLM in requirements.txt pins torch 2.13.0 built for CUDA 13.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    LMCACHE_TRACK_USAGE=false

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY handler/ handler/
COPY test_input.json .

CMD ["python", "-m", "handler"]
