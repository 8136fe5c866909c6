# syntax=docker/dockerfile:1
# One image for every fg-bus service: the trainer (fg-train), the sinks (fg-sink), fg-bus and TensorBoard.
#
#   docker build -t fg-bus .                                  # CPU build of torch (the default)
#   docker build -t fg-bus:cu128 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .    # a CUDA build of torch
#
# docker-compose.yml builds it for all its services (`docker compose up --build`).
FROM python:3.11-slim

# torch comes first, from its own index, so that the rest of the dependencies see it as satisfied
# (pyproject.toml asks for torch>=2.2,<3) and pip never fetches the much larger default (CUDA) wheel.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX="https://download.pytorch.org/whl/cpu"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"

WORKDIR /app

# The other dependencies, read from pyproject.toml alone: this layer is rebuilt only when they change,
# not at every edit of the source.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The package itself (console scripts fg-train, fg-sink, fg-bus), then the example configs for
# `docker compose run --rm trainer fg-train /app/examples/...`.
COPY README.md ./
COPY fg_bus ./fg_bus
COPY sinks ./sinks
COPY trainer ./trainer
RUN pip install . && rm -rf build ./*.egg-info
COPY examples ./examples

# Run as a user, not root. /runs is created here, owned by that user, so that a named volume mounted
# on it starts with the same owner (docker copies the image directory's ownership into a new volume).
RUN useradd --create-home --uid 1000 fg \
    && mkdir -p /runs \
    && chown fg:fg /runs
USER fg
# Relative paths (fg-train's default fg-runs/NAME-TIME, fg-sink's defaults) land on the volume.
WORKDIR /runs

CMD ["fg-train", "--help"]
