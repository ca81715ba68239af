# nanollm in a container: the README's install lines, its main job as the default command, and a
# `test` stage that runs the README's test command (tests/test_mlops.py checks that they stay the README's).
#
#   docker build -t nanollm .                          # CPU: python slim + the CPU build of torch
#   docker run --rm -v "$PWD/out:/nanollm/out" nanollm # the main job: python train.py
#   docker build --target test -t nanollm-test . && docker run --rm nanollm-test   # the test suite
#
# CUDA: the same image with torch's CUDA build (its wheels bring the CUDA libraries; the host needs
# only the NVIDIA driver and the NVIDIA Container Toolkit):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t nanollm:cuda .
#   docker run --rm --gpus all --ipc=host -v "$PWD/out:/nanollm/out" nanollm:cuda \
#       torchrun --standalone --nproc_per_node=8 fsdp2_train.py --init_from gpt2 --dataset shakespeare
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim AS base
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# torch first, from the index of the build wanted (README: a plain `pip install torch` is the
# multi-GB CUDA build); then the README's install line
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install torch --index-url ${TORCH_INDEX}
WORKDIR /nanollm
COPY requirements.txt requirements-dev.txt ./
RUN pip install -r requirements.txt
COPY . .

# the test stage: the reference packages, headless Chromium for the chat page's browser test (as .ci/run), the suite
FROM base AS test
RUN apt-get update && apt-get install -y --no-install-recommends chromium chromium-driver \
    && rm -rf /var/lib/apt/lists/*
RUN pip install -r requirements-dev.txt
CMD ["python", "-m", "pytest"]

# the default image (the last stage): the README's main job
FROM base AS app
CMD ["python", "train.py"]
