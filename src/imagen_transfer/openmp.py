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

The thread count is the lever, so the command line chooses it from the load (`auto_threads`): every few seconds
`adapt` reads how many cores other processes kept busy since its last look (/proc/stat less this process's own CPU
time) and runs one thread per core they left free, at least one. IMAGEN_TRANSFER_THREADS=N, OMP_NUM_THREADS or
train.threads fix the count instead; a library caller's own torch.set_num_threads is never overridden.

`cpu` names the CPU (model, cores, the instruction sets torch's kernels choose by) for a run's start record and the
benchmarks' tables: a time compares only on the same CPU (environment notes: an AMD EPYC without AMX trained bf16
1.32x faster than fp32, an Intel Xeon with AMX differently).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

SPINCOUNT: str | None = None  # a value to set when the user set none; None: libgomp's own (see module doc)
VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
THREADS_VARIABLE = "IMAGEN_TRANSFER_THREADS"  # "auto" (the command line's default) or a fixed count
EVERY_S = 2.0  # how often `adapt` looks at the load: /proc/stat counts in 10 ms ticks, 2 cores x 2 s = 400 of them

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")  # the tiers torch's CPU kernels pick from

_chosen: dict = {}
_auto: dict = dict(on=False)


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


def cpu_times() -> tuple[float, float, float] | None:
    """(CPU seconds all processes ran, CPU seconds this process ran, monotonic time) from Linux's /proc; None where
    there is no /proc or it counts more CPUs than this process may use (a container's host: others' work on cores
    we cannot run on is not a load on ours)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if sum(line.startswith("cpu") for line in lines) - 1 != len(os.sched_getaffinity(0)):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in lines[0].split()[1:8])
    tick = os.sysconf("SC_CLK_TCK")  # steal is left out: the hypervisor's, not a process we could make room for
    return (user + nice + system + irq + softirq) / tick, (int(own[11]) + int(own[12])) / tick, time.monotonic()


def others_busy(before: tuple, after: tuple) -> float:
    """Cores' worth of CPU time other processes used between two `cpu_times` readings."""
    busy, own, wall = (a - b for a, b in zip(after, before))
    return max(0.0, (busy - own) / wall) if wall > 0 else 0.0


def threads_for(cores: int, busy: float) -> int:
    """One thread per core the other processes left free (a core counts as theirs from half its time), at least
    one: beside a 2-thread load one thread trained 2x the images/s of two (under_load_cpu.json)."""
    return max(1, cores - int(busy + 0.5))


def auto_threads(on: bool = True, environ=os.environ) -> str:
    """Let `adapt` choose the thread count from the load (the command line calls this; off again with on=False),
    unless the user fixed it: IMAGEN_TRANSFER_THREADS=N or OMP_NUM_THREADS. Returns the choice, for `describe`."""
    import torch  # here, not at the top: configure() must run before torch loads libgomp

    fixed = environ.get(THREADS_VARIABLE, "auto")
    if not on:
        if _auto["on"] and torch.get_num_threads() == _auto["set"]:
            torch.set_num_threads(_auto["cores"])  # as it found them
        _auto.update(on=False)
    elif fixed != "auto":
        if not fixed.isdigit() or int(fixed) < 1:
            from .errors import UserError  # only on this error: errors.py is not needed otherwise

            raise UserError(f"{THREADS_VARIABLE}={fixed!r}: set it to auto or to a thread count of at least 1")
        torch.set_num_threads(int(fixed))
        _auto.update(on=False, how=f"{THREADS_VARIABLE}={fixed}")
    elif "OMP_NUM_THREADS" in environ:
        _auto.update(on=False, how=f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS']}")
    elif (now := cpu_times()) is None:
        _auto.update(on=False, how="fixed: /proc/stat does not describe this process's cores")
    else:
        cores = torch.get_num_threads()
        _auto.update(on=True, cores=cores, set=cores, last=now, changes=0,
                     how=f"auto: 1-{cores}, one per core other processes leave free ({THREADS_VARIABLE}=N fixes it)")
    return _auto.get("how", "torch's default")


def fix_threads(n: int) -> None:
    """A count the run's config fixed (train.threads): set, and `adapt` stops choosing."""
    import torch  # here, not at the top: see auto_threads

    torch.set_num_threads(n)
    _auto.update(on=False, how=f"train.threads={n}")


def adapt(every_s: float = EVERY_S) -> int | None:
    """In a long loop: when auto_threads is on and `every_s` passed since the last look, set the thread count from
    the load of that interval. Returns the new count when it changed, else None. Cheap between looks (one clock
    read). A count changed by someone else (torch.set_num_threads) ends the choosing: theirs wins."""
    if not _auto["on"] or time.monotonic() - _auto["last"][2] < every_s:
        return None
    import torch  # here, not at the top: see auto_threads

    if torch.get_num_threads() != _auto["set"]:
        _auto.update(on=False, how=f"fixed at {torch.get_num_threads()} by a torch.set_num_threads call")
        return None
    now = cpu_times()
    if now is None:
        return None
    busy, _auto["last"] = others_busy(_auto["last"], now), now
    n = threads_for(_auto["cores"], busy)
    if n == _auto["set"]:
        return None
    torch.set_num_threads(n)
    _auto.update(set=n, changes=_auto["changes"] + 1, busy=round(busy, 2))
    return n


def cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict:
    """{name, cores, flags}: the CPU's model name (from Linux's /proc/cpuinfo, else what `platform` knows), the cores
    this process may use, and which of CPU_FLAGS it has. Reads no torch: benchmarks call it before torch loads."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []

    def field(key: str) -> str | None:
        return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key), None)
    flags = (field("flags") or "").split()
    return dict(name=field("model name") or platform.processor() or platform.machine() or "unknown",
                cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                flags=[f for f in CPU_FLAGS if f in flags])


def record() -> dict:
    """The process's threads, how they are chosen, the OpenMP wait settings, the CPU and torch's version, for a
    run's start record."""
    import torch  # here, not at the top: configure() must run before torch loads libgomp

    return dict(threads=torch.get_num_threads(), thread_choice=_auto.get("how", "torch's default"), **_chosen,
                cpu=cpu(), torch=torch.__version__)


def describe() -> str:
    """One line for a run's start: the CPU, its threads and how they wait."""
    r = record()
    wait = ", ".join(f"{k}={r[k]}" for k in VARIABLES if k in r) or "libgomp's defaults"
    c = r["cpu"]
    return (f"CPU: {c['name']} ({c['cores']} cores; {', '.join(c['flags']) or 'none of ' + '/'.join(CPU_FLAGS)}), "
            f"{r['threads']} threads ({r['thread_choice']}), OpenMP wait {wait} (set by {r['set_by']}; "
            "OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment override it)")
