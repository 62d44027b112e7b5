"""How torch's OpenMP threads wait on a CPU that other programs share (issue #39).

torch's CPU wheels run their parallel regions on GNU OpenMP (libgomp). Between regions an idle thread spins for
GOMP_SPINCOUNT iterations (300,000 by default) before it sleeps; beside another busy process a thread may spin for
a descheduled sibling, so a training step beside one competing 2-thread process ran 3.8-4.8x slower than alone where
a fair share is 2x. benchmarks/under_load.py measures the levers alone and beside such a load
(benchmarks/results/under_load_cpu.json): neither a short spin (GOMP_SPINCOUNT=10000) nor OMP_WAIT_POLICY=PASSIVE
beat libgomp's default beside a spinning 2-thread load, one thread did (about 2x the default's images/s loaded, 0.6x
alone). So `SPINCOUNT` is None: the process keeps libgomp's defaults unless the user sets OMP_WAIT_POLICY or
GOMP_SPINCOUNT (or fewer threads: train.threads), and every training run records what it ran with (`record`).

libgomp reads these variables once, when torch loads it, so `configure` runs when imagen_transfer is imported.
"""

from __future__ import annotations

import os
import sys

SPINCOUNT: str | None = None  # a value to set when the user set none; None: libgomp's own (see module doc)
VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

_chosen: dict = {}


def configure(environ=os.environ) -> dict:
    """Set GOMP_SPINCOUNT=SPINCOUNT (when not None) unless the user chose a wait policy; a no-op once torch is loaded
    (too late for libgomp to read it). Returns what was decided (see `record`)."""
    user = {k: environ[k] for k in VARIABLES if k in environ}
    if user:
        decided = dict(set_by="environment", **user)
    elif SPINCOUNT is None:
        decided = dict(set_by="libgomp's defaults")
    elif "torch" in sys.modules:
        decided = dict(set_by="libgomp: torch was imported before imagen_transfer")
    else:
        environ["GOMP_SPINCOUNT"] = SPINCOUNT
        decided = dict(set_by="imagen_transfer", GOMP_SPINCOUNT=SPINCOUNT)
    _chosen.clear()
    _chosen.update(decided)
    return decided


def record() -> dict:
    """The process's threads and OpenMP wait settings, for a run's start record."""
    import torch  # here, not at the top: configure() must run before torch loads libgomp

    return dict(threads=torch.get_num_threads(), **_chosen)


def describe() -> str:
    """One line for a run's start: threads and how they wait."""
    r = record()
    wait = ", ".join(f"{k}={r[k]}" for k in VARIABLES if k in r) or "libgomp's defaults"
    return (f"CPU: {r['threads']} threads, OpenMP wait {wait} (set by {r['set_by']}; OMP_WAIT_POLICY or "
            "GOMP_SPINCOUNT in the environment override it, train.threads the thread count)")
