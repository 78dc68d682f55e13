#!/usr/bin/env bash
# Run the whole test suite (sets up .venv first). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m "not mmdet2"` for the fast core subset.
# With no arguments the MMDetection 3.x tests run too, afterwards, in their own venv (.venv3, set up by
# scripts/setup_mmdet3.sh: mmcv 2.x and mmcv-full 1.x cannot share one). MMDET3=1 adds them to a run with
# arguments, MMDET3=0 leaves them out of a run without.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${MMDET3:-$([ $# -eq 0 ] && echo 1 || echo 0)}" != 1 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
status=0
.venv/bin/python -m pytest "$@" || status=$?
bash scripts/setup_mmdet3.sh
.venv3/bin/python -m pytest tests/test_mmdet3.py || status=$?
exit $status
