#!/usr/bin/env bash
# Create .venv3: the MMDetection 3.x stack (mmengine 0.10.7, mmcv 2.1.0, mmdet 3.3.0) beside the
# sidecar and the trainer hook. Its own venv because mmcv 2.x and mmcv-full 1.x share the import name
# `mmcv` (and mmdet 2.x/3.x share `mmdet`), so .venv (MMDetection 2.x) cannot hold it.
# Idempotent: does nothing when $VENV3 is already set up for this version of the recipe.
# The recipe and why each step is there: ../shared/DESIGN.md "Environment facts".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV3=${VENV3:-.venv3}
# The CPU build of torch that lies on this machine's disk (pip's find-links): ~0.9 GB in the venv where
# PyPI's CUDA build takes 5.5 GB. The 3.x stack imports no torchvision, so it needs no torchvision build
# that matches (PyPI's torchvision cannot load beside the CPU torch).
TORCH=2.13.0
# The compiled mmcv wheel is kept here, per torch version (its ops link against torch), so a second setup
# (or a fresh venv) skips the ~10 min compile.
WHEELS=${MMCV_WHEEL_DIR:-$HOME/.cache/wandb-sidecar-wheels}/torch-$TORCH-cpu
stamp="$VENV3/.setup-$(cat scripts/setup_mmdet3.sh pyproject.toml | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0

python3 -m venv "$VENV3"
PIP="$VENV3/bin/pip"
$PIP install -q --upgrade pip
$PIP install -q "torch==$TORCH"
python_torch=$("$VENV3/bin/python" -c 'import torch; print(torch.__version__)')
case "$python_torch" in
    *+cpu) ;;
    *) echo "setup_mmdet3: got torch $python_torch, expected the CPU build $TORCH+cpu" \
            "(pip's find-links on this machine hold it; a CUDA build costs 5 GB of disk)" >&2 ;;
esac
# Build tools for mmcv's ops; setuptools below 82 because mmengine 0.10.7 imports pkg_resources at run
# time, and at least 77.0.3 for torch's metadata.
$PIP install -q 'setuptools>=77.0.3,<82' wheel ninja
# mmcv 2.1.0 has no wheel for this torch: compile its CPU ops once, against the venv's torch.
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
    MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} $PIP wheel -q --isolated --no-deps --no-build-isolation \
        mmcv==2.1.0 -w "$WHEELS"
fi
$PIP install -q --no-deps "$(ls "$WHEELS"/mmcv-2.1.0-*.whl | head -n1)"
$PIP install -q mmcv==2.1.0 mmengine==0.10.7 mmdet==3.3.0 pycocotools wandb
# mmcv's and mmengine's metadata pull in the GUI opencv-python beside the headless one: keep headless cv2.
$PIP install -q --force-reinstall --no-deps opencv-python-headless
$PIP install -q -e '.[sidecar,test]'
touch "$stamp"
