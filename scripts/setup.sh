#!/usr/bin/env bash
# Create .venv with everything: the sidecar, the trainer hook, the MMDetection 2.x stack, the test tools.
# Idempotent: does nothing when .venv is already set up for this version of the recipe.
# The recipe and why each step is there: ../shared/DESIGN.md "Environment facts" (mirrored in README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
stamp="$VENV/.setup-$(cat scripts/setup.sh pyproject.toml | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

need_gb=7  # this venv (torch's CUDA build: 5.5 GB) + .venv3 (CPU torch) + pip's temporary files
free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
if [ "${free_gb:-0}" -lt "$need_gb" ]; then
    echo "setup: only ${free_gb} GB free on $(df -P . | awk 'NR==2 {print $6}'); the venvs need about ${need_gb} GB" >&2
fi
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
$PIP install -q --upgrade pip
# torch + torchvision from the registry (--isolated skips this machine's find-links, whose CPU-only
# torch file cannot load PyPI's torchvision ops; mmcv 1.x imports torchvision).
# --no-cache-dir: the CUDA wheels (3 GB) are not kept twice on a small disk.
$PIP install -q --isolated --no-cache-dir torch==2.13.0 torchvision==0.28.0
# mmcv-full 1.7.2 has no wheel for this torch: compile its CPU ops (~10-15 min once; pip caches the wheel).
$PIP install -q 'setuptools<70' wheel ninja
MAX_JOBS=${MAX_JOBS:-2} $PIP install -q --no-build-isolation mmcv-full==1.7.2
$PIP install -q mmdet==2.28.2 yapf==0.40.1 opencv-python-headless pycocotools
$PIP install -q -e '.[sidecar,test]'
touch "$stamp"
