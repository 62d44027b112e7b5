"""How torch's OpenMP threads wait on a CPU that other programs share (issue #39).

torch's CPU wheels run their parallel regions on GNU OpenMP (libgomp). Between regions an idle thread spins for
GOMP_SPINCOUNT iterations (300,000 by default) before it sleeps. Alone on the cores that is the fastest choice; beside
another busy process it is the slowest: a thread spins while the sibling it waits for is descheduled, so a training
step beside one competing 2-thread process ran 3.8x slower than alone where a fair share is 2x
(docs/performance.md, "Under load"). A short spin keeps most of the speed alone and gives the cores back under load;
OMP_WAIT_POLICY=PASSIVE (no spin at all) pays a wake-up in every one of a step's thousands of small regions.

libgomp reads these variables once, when torch loads it, so `configure` runs when imagen_transfer is imported (before
any torch import of ours). Whatever the user set (OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment) wins; the
choice is recorded in every training run's start record (`record`).
"""

from __future__ import annotations

import os
import sys

SPINCOUNT = "10000"  # chosen by benchmarks/under_load.py (benchmarks/results/under_load_cpu.json)
VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

_chosen: dict = {}


def configure(environ=os.environ) -> dict:
    """Set GOMP_SPINCOUNT=SPINCOUNT unless the user chose a wait policy; a no-op once torch is loaded (too late for
    libgomp to read it). Returns what was decided (see `record`)."""
    user = {k: environ[k] for k in VARIABLES if k in environ}
    if user:
        decided = dict(set_by="environment", **user)
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
