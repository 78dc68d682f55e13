#!/usr/bin/env bash
# The main job on the embedded default: sidecar (wandb offline) + a tiny real MMDetection training.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m examples.demo "$@"
