# The sidecar only: no torch, no mmcv. Trainers connect to it over ZeroMQ.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY trainer_hook ./trainer_hook
COPY sidecar ./sidecar
RUN pip install --no-cache-dir '.[sidecar]' \
    && useradd --create-home --uid 1000 sidecar \
    && mkdir -p /var/lib/wandb-sidecar/journal /var/lib/wandb-sidecar/wandb /keys \
    && chown -R sidecar:sidecar /var/lib/wandb-sidecar

USER sidecar
WORKDIR /var/lib/wandb-sidecar
ENV WANDB_DIR=/var/lib/wandb-sidecar/wandb \
    WANDB_SIDECAR_JOURNAL=/var/lib/wandb-sidecar/journal \
    WANDB_SIDECAR_BIND=tcp://0.0.0.0:5555 \
    WANDB_SIDECAR_ADDR=tcp://127.0.0.1:5555
EXPOSE 5555
# `status` exits non-zero when the sidecar does not answer on its socket.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["wandb-sidecar", "status", "--connect", "tcp://127.0.0.1:5555", "--timeout", "3"]
CMD ["wandb-sidecar", "serve"]
