# gptstack serving image: `gptstack serve` (OpenAI-compatible API) as a non-root user.
# How to build, run, pass keys and deploy it: docs/deploy.md.
#
#   CPU (default)       docker build -t gptstack:cpu .
#   CUDA                docker build -t gptstack:cuda --build-arg TORCH_VARIANT=cu128 .
#   for KubeRay         docker build -t gptstack:ray --build-arg EXTRAS=ray .      (adds Ray Serve)
#
#   docker run --rm -p 8000:8000 \
#     -v "$PWD/runs/demo/best:/models/model:ro" \
#     -v "$PWD/api-keys:/run/secrets/gptstack/api-keys:ro" gptstack:cpu
#
# No `# syntax=` line on purpose: BuildKit would fetch that frontend from a registry, and the
# built-in one already knows everything used here (RUN --mount=type=cache), as does podman/buildah.

# Both stages start from the same image, so the virtualenv copied between them finds its python.
ARG BASE_IMAGE=python:3.11-slim-bookworm

######## build: compiler, torch, the project and its C++ decode kernels ########
FROM ${BASE_IMAGE} AS build

# torch comes from the PyTorch index of one variant: "cpu", or a CUDA one such as "cu128" (the tags
# that exist for this version are the folders of https://download.pytorch.org/whl/). TORCH_INDEX_URL
# overrides the whole address (a mirror, or an index of your own).
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# optional extras of the project, comma-separated: "ray" for the KubeRay image
ARG EXTRAS=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1

# g++ builds the decode kernels (setup.py, csrc/); it stays in this stage. Debian packages are not
# pinned to versions (DL3008): the mirror drops old ones with each point release and security fix.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/gptstack
ENV PATH=/opt/gptstack/bin:$PATH

# torch first, pinned, from its variant's index: pip never picks a torch build by itself.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && pip install "setuptools>=68" "wheel>=0.40"

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY csrc/ csrc/
COPY src/ src/

# The project without build isolation, so that setup.py compiles the kernels against the torch
# above. torch is named again with its pin: already satisfied, so pip leaves it alone, and a
# dependency asking for another torch fails the build instead of replacing it. Then the image
# proves it: the same torch, and the kernels built (not the silent pure-PyTorch fallback).
# (DL3013 asks for pinned pip packages: "." is this project, torch is pinned.)
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-build-isolation ".${EXTRAS:+[${EXTRAS}]}" "torch==${TORCH_VERSION}" \
 && python -c "import torch; from gptstack.inference import kernels; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; \
assert kernels.available(), 'gptstack._kernels was not built'; \
print('torch', torch.__version__, 'kernels', kernels.isa())"

######## runtime: the virtualenv, no compiler, a non-root user ########
FROM ${BASE_IMAGE} AS runtime

# wget: KubeRay's default Pod probes run it (Ray nodes). /etc/profile.d: KubeRay starts Ray
# through `bash -lc`, whose /etc/profile resets PATH; this puts the virtualenv back in front
# ($PATH in single quotes on purpose: it expands at login, hence SC2016 off).
# hadolint ignore=DL3008,SC2016
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 gptstack \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/gptstack --shell /bin/bash gptstack \
 && mkdir -p /models /run/secrets/gptstack \
 && echo 'export PATH=/opt/gptstack/bin:$PATH' > /etc/profile.d/gptstack.sh

COPY --from=build /opt/gptstack /opt/gptstack

# GPTSTACK_CACHE_DIR: the dtype probe's cache in a writable place even with a read-only root
# filesystem (mount an emptyDir / tmpfs at /tmp there).
ENV PATH=/opt/gptstack/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GPTSTACK_CACHE_DIR=/tmp/gptstack

# numeric, so that Kubernetes' runAsNonRoot can check it
USER 10001:10001
WORKDIR /home/gptstack
EXPOSE 8000

# /health is public (no key). Docker uses this; Kubernetes has its own probes (docs/deploy.md).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# Arguments after the image name replace CMD (not ENTRYPOINT): give the checkpoint and where the
# keys are again, plus any other `gptstack serve` flag. Keys never go on this command line: a
# mounted file (--api-keys-file) or GPTSTACK_API_KEYS set from a secret.
ENTRYPOINT ["gptstack", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--checkpoint", "/models/model", "--api-keys-file", "/run/secrets/gptstack/api-keys"]
