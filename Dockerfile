# Z-Image Turbo as a Runpod serverless worker.
#
#   docker build -t <registry>/zimage-turbo-worker:<tag> .
#   docker build --build-arg ZIMAGE_REVISION=<commit> --build-arg SAFETY_REVISION=<commit> ...
#   docker build --build-arg BAKE_WEIGHTS=safety ...   # the checker only: Z-Image from Runpod's cache
#   docker build --build-arg ZIMAGE_BASE_REPO=Tongyi-MAI/Z-Image ...   # the base model beside Turbo
#   docker build --build-arg BAKE_WEIGHTS=0 ...        # no weights: all from a network volume
#
# Layers run from the least to the most often changed: system and Python packages, then
# the weights (about 12.8 GB), then the worker's code. A code change rebuilds only the last
# layer, so it neither downloads the weights again nor makes workers pull them again.

# CUDA's "base" image: the driver hooks and cudart only. The torch wheels bring their own
# cuBLAS, cuDNN and NCCL as pip packages; a cudnn-runtime base would ship a second copy
# (several GB) that nothing loads. PyPI's torch 2.13.0 is built for CUDA 13.0, so hosts need
# driver >= 580 (the Hub entry allows CUDA 13.0 only).
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

# RUNPOD_MIN_CUDA_VERSION: the CUDA that torch's wheels need (13.0, the lock's cuda-toolkit). The
# Runpod SDK's start-up check compares the host driver's CUDA with it and reports an older one
# as an unhealthy worker, so Runpod replaces the machine instead of restarting a worker that
# could never run a kernel (docs/deploy.md, "An unhealthy worker").
ENV RUNPOD_MIN_CUDA_VERSION=13.0 \
    DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python 3.12, in a venv: the system Python refuses pip installs (PEP 668).
# DL3008 (pin apt versions) is ignored on purpose: Ubuntu's archive drops superseded
# package versions, so a pinned one stops resolving within weeks; the base image tag pins
# the release (noble), and every Python package below is pinned exactly.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# 1. Python packages: exactly locks/worker-cuda.txt (written by scripts/lock.sh), every
#    package pinned and checked against its hashes, torch's CUDA build from PyPI included.
#    --no-deps: a package the lock does not name is an error here, never a silent download.
COPY locks/worker-cuda.txt /tmp/worker-cuda.txt
RUN pip install --no-cache-dir --require-hashes --no-deps -r /tmp/worker-cuda.txt
# torchao for ZIMAGE_PRECISION=fp8, in a folder of its own: beside diffusers it would be imported
# on every start; src/model/pipeline.py puts /opt/fp8 on the path only when fp8 asks for it.
COPY locks/fp8-cuda.txt /tmp/fp8-cuda.txt
RUN pip install --no-cache-dir --require-hashes --no-deps --target /opt/fp8 -r /tmp/fp8-cuda.txt

# 2. Weights, baked into /models/<repo name> where src/model/files.py looks for them.
#    Only the download script is copied here, so editing the worker keeps this layer cached.
#    Pin the revisions (a commit hash) for reproducible images: "" means the main branch.
#    BAKE_WEIGHTS: 1 both models; safety the 0.3 GB checker only (an endpoint's cached model
#    is limited to one repo: Z-Image); 0 none (a network volume holds both).
#    ZIMAGE_BASE_REPO bakes the undistilled base Z-Image too: 12.3 GB more beside Turbo (its
#    text encoder, tokenizer and VAE, where the Hub lists the same files as Turbo's, are links
#    to Turbo's folders, not a second copy), about 20.5 GB alone (BAKE_WEIGHTS=safety or
#    ZIMAGE_REPO=none); none: no base.
#    PROMPT_EXPANDER_REPO bakes the prompt expander (enable_prompt_expansion): with Turbo baked,
#    only its files whose Hub sha256 differs from Turbo's text encoder's are fetched (Qwen3-4B:
#    about 0.1 GB), the rest are links to Turbo's files; without Turbo (BAKE_WEIGHTS=safety) it
#    is fetched whole (8 GB). none: no expander, and PROMPT_EXPANDER_MODEL=none.
#    CONTROLNET_REPO bakes one single-file ControlNet release (CONTROLNET_FILE, default
#    <repo name>.safetensors; 2.1 is 6.7 GB) and DEPTH_REPO beside it; none: no control.
#    POSE_REPO (a ViTPose, 0.36 GB for vitpose-base-simple) and POSE_DETECTOR_REPO (an RT-DETR
#    person detector, 0.17 GB) are baked beside a ControlNet too; POSE_REPO=none: no pose.
#    TILE_CONTROLNET bakes the Tile ControlNet for upscaling, named as TILE_CONTROLNET_MODEL
#    names it (Org/Name/file.safetensors: alibaba-pai/Z-Image-Turbo-Fun-Controlnet-Union-2.1/
#    Z-Image-Turbo-Fun-Controlnet-Tile-2.1-8steps.safetensors, 6.7 GB); none: upscaling without it.
ARG ZIMAGE_REPO=Tongyi-MAI/Z-Image-Turbo
ARG ZIMAGE_REVISION=
ARG SAFETY_REPO=Falconsai/nsfw_image_detection
ARG SAFETY_REVISION=
ARG ZIMAGE_BASE_REPO=none
ARG ZIMAGE_BASE_REVISION=
ARG BAKE_WEIGHTS=1
ARG CONTROLNET_REPO=none
ARG CONTROLNET_FILE=
ARG CONTROLNET_REVISION=
ARG DEPTH_REPO=depth-anything/Depth-Anything-V2-Small-hf
ARG DEPTH_REVISION=
ARG PROMPT_EXPANDER_REPO=Qwen/Qwen3-4B
ARG PROMPT_EXPANDER_REVISION=
ARG POSE_REPO=usyd-community/vitpose-base-simple
ARG POSE_REVISION=
ARG POSE_DETECTOR_REPO=PekingU/rtdetr_r50vd_coco_o365
ARG POSE_DETECTOR_REVISION=
ARG TILE_CONTROLNET=none
ARG TILE_CONTROLNET_REVISION=
COPY builder/download_weights.py /opt/builder/download_weights.py
RUN case "$BAKE_WEIGHTS" in \
      1) turbo="$ZIMAGE_REPO" ;; \
      safety) turbo=none ;; \
      0) echo "BAKE_WEIGHTS=0: no weights in the image (Runpod cached models or a network volume)"; exit 0 ;; \
      *) echo "BAKE_WEIGHTS must be 1, safety or 0, got '$BAKE_WEIGHTS'" >&2; exit 1 ;; \
    esac \
 && python /opt/builder/download_weights.py --dest /models \
      --zimage-repo "$turbo" --zimage-revision "$ZIMAGE_REVISION" \
      --safety-repo "$SAFETY_REPO" --safety-revision "$SAFETY_REVISION" \
      --base-repo "$ZIMAGE_BASE_REPO" --base-revision "$ZIMAGE_BASE_REVISION" \
      --controlnet-repo "$CONTROLNET_REPO" --controlnet-file "$CONTROLNET_FILE" \
      --controlnet-revision "$CONTROLNET_REVISION" \
      --depth-repo "$DEPTH_REPO" --depth-revision "$DEPTH_REVISION" \
      --expander-repo "$PROMPT_EXPANDER_REPO" --expander-revision "$PROMPT_EXPANDER_REVISION" \
      --pose-repo "$POSE_REPO" --pose-revision "$POSE_REVISION" \
      --pose-detector-repo "$POSE_DETECTOR_REPO" --pose-detector-revision "$POSE_DETECTOR_REVISION" \
      --tile-controlnet "$TILE_CONTROLNET" --tile-controlnet-revision "$TILE_CONTROLNET_REVISION"

# The worker looks for the repos it was built with; at run time it never reaches the Hub
# (weights missing from every local place stop it at start, with where it looked).
# A repo id is found in /models/<repo name> when baked; none (the base's default) serves no model.
ENV ZIMAGE_MODEL=$ZIMAGE_REPO \
    ZIMAGE_BASE_MODEL=$ZIMAGE_BASE_REPO \
    SAFETY_CHECKER_MODEL=$SAFETY_REPO \
    CONTROLNET_MODEL=$CONTROLNET_REPO \
    TILE_CONTROLNET_MODEL=$TILE_CONTROLNET \
    DEPTH_MODEL=$DEPTH_REPO \
    PROMPT_EXPANDER_MODEL=$PROMPT_EXPANDER_REPO \
    POSE_MODEL=$POSE_REPO \
    POSE_DETECTOR_MODEL=$POSE_DETECTOR_REPO \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1

# 3. The worker's code, last.
WORKDIR /app
COPY . /app

CMD ["python", "-u", "handler.py"]
