# plsynth-infer image: GPU (default) or CPU variant.
#
#   GPU: docker build -t plsynth-infer:gpu --build-arg BUNDLE=runs/sa-cps/bundle .
#   CPU: docker build -t plsynth-infer:cpu --build-arg VARIANT=cpu --build-arg BASE=python:3.11-slim \
#            --build-arg BUNDLE=runs/sa-cps/bundle .
#
# The model bundle (and lungmask weights placed in docker/weights/) are baked in at build time;
# nothing is downloaded at run time. NOT BUILT HERE: no Docker engine runs on the development
# machines; the install and entry-point steps live in docker/install.sh, which CI runs.
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ARG VARIANT=gpu
ARG BUNDLE=bundle

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive
RUN if command -v apt-get >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; fi \
    && python3 -m venv /opt/venv \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp plsynth

# Only what the install needs (the .dockerignore keeps .git, .venv and runs/ out of the context too).
COPY pyproject.toml README.md /src/
COPY src /src/src
COPY docker/install.sh /src/docker/install.sh
RUN PYTHON=/opt/venv/bin/python /src/docker/install.sh /src --variant ${VARIANT} && rm -rf /src

COPY ${BUNDLE} /opt/plsynth/bundle
COPY docker/weights/ /opt/plsynth/torch/hub/checkpoints/

# No $HOME writes: caches go to /tmp or a mounted volume; no telemetry.
ENV PATH=/opt/venv/bin:$PATH \
    PLSYNTH_MODEL=/opt/plsynth/bundle \
    PLSYNTH_CACHE_DIR=/tmp/plsynth-cache \
    TORCH_HOME=/opt/plsynth/torch \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    RAY_USAGE_STATS_ENABLED=0
# Entry point and baked-in bundle checked at build time (every sha256 verified).
COPY docker/install.sh /opt/plsynth/install.sh
RUN PYTHON=/opt/venv/bin/python /opt/plsynth/install.sh --check-only

USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["plsynth-infer"]
CMD ["--help"]
