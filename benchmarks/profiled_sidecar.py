"""The real sidecar with its receiving thread (the main one) under cProfile: ``PROFILE_OUT`` names the stats
file (written at exit). Workers (wandb delivery) are not profiled.

    PROFILE_OUT=side.prof python -m benchmarks.profiled_sidecar serve ...
"""

from __future__ import annotations

import cProfile
import os

from sidecar.cli import main

if __name__ == "__main__":
    prof = cProfile.Profile()
    try:
        prof.runcall(main)
    finally:
        prof.dump_stats(os.environ["PROFILE_OUT"])
