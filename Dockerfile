# syntax=docker/dockerfile:1
#
# Three images from one file (docs/DEPLOY.md):
#   docker build -t minigpt5-triton .                      -> the server (last stage, the default target)
#   docker build -t minigpt5-loadtest --target loadtest .  -> Locust + the thin client, no torch
#   docker build -t minigpt5-gateway --target gateway .    -> the OpenAI-compatible gateway, no torch
#
# The server image holds code only. Weights are mounted at run time (a read-only bind mount in
# docker-compose.yml, a PersistentVolumeClaim in deploy/k8s): they are never copied into the image,
# and .dockerignore keeps weight files out of the build context altogether.

# The exact Triton the tests run on: 24.10 = Triton 2.51.0, Ubuntu 22.04, Python 3.10 python-backend stub.
# That image carries every Triton backend (TensorRT, ONNX Runtime, OpenVINO, PyTorch/libtorch, ...); we
# use only the python backend. A smaller base with only that one, made by NVIDIA's own tool on the
# 24.10-py3-min image (docs/DEPLOY.md, "A smaller image"), goes in here unchanged:
#   python3 compose.py --backend python --container-version 24.10 --output-name tritonserver-python:24.10
#   docker build --build-arg TRITON_IMAGE=tritonserver-python:24.10 -t minigpt5-triton .
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:24.10-py3

# ---------------------------------------------------------------------------------------------------
# Load-test image: Locust master and workers (docker-compose.yml, profile "loadtest").
# Only the base dependencies (tritonclient, numpy<2, pillow) + locust: no torch, a few hundred MB.
FROM python:3.11-slim-bookworm AS loadtest
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/minigpt5
COPY . .
RUN pip install ".[loadtest]" \
 && mkdir /reports && chown nobody:nogroup /reports
# Reports: docker-compose.yml mounts a named volume on /reports (it takes this folder's owner).
# Locust's master UI (8089) and the master <-> worker channel (5557).
EXPOSE 8089 5557
USER nobody
ENTRYPOINT ["locust"]

# ---------------------------------------------------------------------------------------------------
# Gateway image: `minigpt5 gateway`, the OpenAI-compatible HTTP API (docs/GATEWAY.md). The thin client
# + the `gateway` extra (starlette, uvicorn, openai, httpx): no torch, a few hundred MB.
FROM python:3.11-slim-bookworm AS gateway
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/minigpt5
COPY . .
RUN pip install ".[gateway]" \
 && python -c "import sys, minigpt5_client.gateway.app as app; assert 'torch' not in sys.modules; \
assert (app.STATIC_DIR / 'index.html').is_file(), 'the web page is not in the package'"
EXPOSE 8080
# nobody, numeric so that Kubernetes' runAsNonRoot can verify it.
USER 65534:65534
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://localhost:8080/health', timeout=4)"
CMD ["minigpt5", "gateway", "--url", "triton:8001", "--host", "0.0.0.0", "--port", "8080"]

# ---------------------------------------------------------------------------------------------------
# Server image.
FROM ${TRITON_IMAGE} AS server

# torch comes from PyTorch's CUDA wheel index, pinned: PyPI's default build, or a floating version
# pulled in by transformers/diffusers, could pair a different CUDA with the drivers you run.
# The wheel brings its own CUDA runtime libraries, so what must match is the node's *driver*:
# pick the cuXYZ index whose CUDA your GPU nodes' driver supports (nvidia-smi shows the highest).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE: no model hub at run time; every file comes from the weights mount.
# MINIGPT5_CACHE: where `minigpt5 serve` builds and caches the tiny weights when no --weights is given.
#   Kubernetes mounts an emptyDir there (and on /tmp, serve's work directory): its root fs is read-only.
# HOME: the Triton image's non-root user (uid 1000) has no home directory, and torch, transformers and
#   Triton's JIT write caches under $HOME. Kubernetes mounts an emptyDir there too.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    MINIGPT5_CACHE=/var/cache/minigpt5 \
    HOME=/home/triton-server

# Constraints applied to every later pip install, so that installing the project can neither swap
# the CUDA torch for another build nor upgrade numpy: Triton 2.51's python-backend stub mis-sizes
# numpy-2 arrays ("output tensor shape does not match size of output").
RUN printf 'torch==%s\nnumpy<2\n' "${TORCH_VERSION}" > /etc/minigpt5-constraints.txt
ENV PIP_CONSTRAINT=/etc/minigpt5-constraints.txt

# 0) curl, for the health checks: the full Triton image has it, a composed python-only one may not.
RUN command -v curl >/dev/null || (apt-get update && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/*)

# 1) torch alone: the biggest layer (several GB) and the one that changes least, so it stays cached.
#    python3 is the system Python 3.10, the interpreter the python-backend stub embeds.
RUN python3 -m pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# 2) The server extra's dependencies, installed from a skeleton of the package holding only
#    pyproject.toml, so that editing code does not re-download transformers and diffusers.
WORKDIR /opt/minigpt5
COPY pyproject.toml ./
RUN mkdir -p minigpt5 client/minigpt5_client bench/minigpt5_bench \
 && touch README.md minigpt5/__init__.py client/minigpt5_client/__init__.py bench/minigpt5_bench/__init__.py \
 && python3 -m pip install ".[server]" \
 && python3 -m pip uninstall -y minigpt5-triton \
 && rm -rf build ./*.egg-info minigpt5 client bench README.md

# 3) The project itself, editable (-e): `minigpt5 serve` runs Triton on model_repository/, which it
#    finds next to the package source (minigpt5/launcher/repository.py), as in a developer checkout; a
#    plain wheel install would not carry that folder.
COPY . .
RUN python3 -m pip install --no-deps -e . \
 && python3 -c "import numpy, torch; assert int(numpy.__version__.split('.')[0]) < 2, numpy.__version__; print('torch', torch.__version__, 'numpy', numpy.__version__)" \
 && mkdir -p "${MINIGPT5_CACHE}" "${HOME}" \
 && chown -R 1000:1000 "${MINIGPT5_CACHE}" "${HOME}"

# Run as the Triton image's unprivileged user. Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 1000:1000

# 8000 HTTP (+ /generate, /generate_stream, health), 8001 gRPC, 8002 Prometheus /metrics.
EXPOSE 8000 8001 8002

# Plain `docker run` gets a health status too. The start period is long because loading the real
# weights takes minutes; compose and Kubernetes define their own probes.
HEALTHCHECK --interval=15s --timeout=5s --start-period=15m --retries=3 \
    CMD curl -fsS http://localhost:8000/v2/health/ready || exit 1

# Stopping: on SIGTERM `serve` lets Triton finish the requests in flight (--exit-timeout-secs, 30 s
# unless given after `--`) and unload the models (20 s more) before it kills anything. Docker's own
# default is 10 s: give `docker run --stop-timeout 60` (exit timeout + 20 + slack), or
# stop_grace_period in compose. There is no readiness deadline in `serve`: HEALTHCHECK above (or
# the orchestrator's startup probe) is the one.
# The Triton image's ENTRYPOINT (/opt/nvidia/nvidia_entrypoint.sh) is kept on purpose: it sets up the
# CUDA forward-compatibility libraries before exec'ing the command. Only the command is ours.
# Without --weights, `serve` builds tiny random weights: give it the mounted real ones.
CMD ["minigpt5", "serve", "--weights", "/weights"]
