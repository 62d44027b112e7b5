"""Training speed alone and beside a competing CPU-bound process, per thread count and OpenMP wait policy (#39).

Each setting runs the same training steps (the shipped `cifar10` base stage, or --model's, batch 32, the run's default precision)
in a fresh process, so the OpenMP runtime reads its environment at start: once alone, once beside a fixed competing
load (a 2-thread torch matmul loop with torch's default OpenMP settings, the kind of process a user's machine runs
beside ours). Settings alternate (alone / loaded, setting by setting, `--repeats` rounds) so drift hits all alike.
Reported: images/s over all timed steps (a mean, not a median: time lost to waiting is the point) and the loaded /
alone slowdown; a fair share of 2 cores beside a 2-thread process is 2x.

    python benchmarks/under_load.py --steps 30 --repeats 2 --out benchmarks/results/under_load_cpu.json

--command times a whole command the same way (once alone, once loaded, each with empty caches), e.g. the demo:

    python benchmarks/under_load.py --command 'imagen-transfer demo --quick --out {out}' --command-dir runs/ul \
        --out benchmarks/results/demo_quick_loaded_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from imagen_transfer.openmp import cpu  # stdlib only: torch still loads in the worker

# name -> environment added to the training process (the competing load always runs with none of it)
SETTINGS = {
    "default (2 threads, libgomp spins)": {},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "2 threads, GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "auto (threads from the load, the command line's default)": {"IMAGEN_TRANSFER_THREADS": "auto"},
}
LOAD = ("import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\n"
        "while True:\n    for _ in range(100):\n        a = torch.tanh(a @ a)\n")


def worker(steps: int, warmup: int, batch: int, model: str) -> None:
    """Time `steps` training steps after `warmup`; print one JSON line."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import our_step

    from imagen_transfer.cascade import load_cascade
    from imagen_transfer.config import load_config
    from imagen_transfer.step import Captioned
    from imagen_transfer.text import load_text_encoder

    torch.manual_seed(0)
    cascade = load_cascade(model)
    stage = cascade.stages[0]
    encoder = load_text_encoder(cascade.text_encoder)
    text, null = encoder(["chest x-ray, normal", "chest x-ray, pneumonia"]), encoder([""])
    images = torch.randint(0, 256, (256, stage.resolution, stage.resolution, 3), dtype=torch.uint8)
    config = load_config(None, [f"train.steps={steps + warmup + 1}", f"train.batch_size={batch}"])
    step, _ = our_step(config, cascade, stage, Captioned(images, torch.arange(len(images)) % 2, text, []), null)
    from imagen_transfer import openmp

    auto = os.environ.get(openmp.THREADS_VARIABLE) == "auto"
    if auto:  # as the command line runs: the count follows the load, looked at every few seconds between steps
        openmp.auto_threads()
    for i in range(warmup):
        openmp.adapt()
        step(i)
    start = time.perf_counter()
    for i in range(steps):
        openmp.adapt()
        step(warmup + i)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(images_per_s=steps * batch / seconds, seconds=seconds, threads=torch.get_num_threads())))


def run_worker(env: dict, args) -> float:
    out = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps), "--warmup",
                          str(args.warmup), "--batch", str(args.batch), "--model", args.model], env={**os.environ, **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def measure(env: dict, loaded: bool, args, run=run_worker):
    if not loaded:
        return run(env, args)
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    load = subprocess.Popen([sys.executable, "-c", LOAD], env=clean)
    try:
        time.sleep(2)  # the load is running before the timed process starts
        return run(env, args)
    finally:
        load.kill()
        load.wait()


def time_command(args) -> None:
    """--command: the whole command alone, then beside the load, each with its own empty cache folder and run
    folder (`{out}` in the command); the phases' times come from `{out}/demo.json` where the command writes one."""
    root = Path(args.command_dir)
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    for loaded in (False, True):
        name = "loaded" if loaded else "alone"
        out = root / name
        if out.exists():
            raise SystemExit(f"{out} exists: pass an empty --command-dir")
        command = args.command.replace("{out}", str(out))

        def run(env, _args, command=command, out=out):
            start = time.perf_counter()
            subprocess.run(command, shell=True, check=True, env={**os.environ, **env,
                                                                  "IMAGEN_TRANSFER_CACHE": str(out) + "-cache"})
            return time.perf_counter() - start

        seconds = measure({}, loaded, args, run)
        demo = out / "demo.json"
        results[name] = dict(seconds=round(seconds, 3),
                             phases=json.loads(demo.read_text())["timings_s"] if demo.is_file() else None)
        print(f"{name}: {seconds:.1f} s", flush=True)
    slowdown = results["loaded"]["seconds"] / results["alone"]["seconds"]
    print(f"\n| command | alone (s) | beside a 2-thread load (s) | slowdown |\n|---|---|---|---|\n"
          f"| `{args.command}` | {results['alone']['seconds']} | {results['loaded']['seconds']} | {slowdown:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(cpu=cpu(), command=args.command,
                                                  load=LOAD, slowdown=round(slowdown, 2), **results), indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--model", default="cifar10", help="the cascade whose base stage trains")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--settings", nargs="*", default=None, help="names of SETTINGS to run (default: all)")
    p.add_argument("--out", default=None, help="a JSON file for the results")
    p.add_argument("--command", default=None, help="time this whole shell command alone and beside the load instead "
                   "(`{out}` becomes a fresh run folder; e.g. 'imagen-transfer demo --quick --out {out}')")
    p.add_argument("--command-dir", default="runs/under-load", help="with --command: where its run folders go")
    args = p.parse_args()
    if args.worker:
        return worker(args.steps, args.warmup, args.batch, args.model)
    if args.command:
        return time_command(args)
    names = args.settings or list(SETTINGS)
    runs = {name: {"alone": [], "loaded": []} for name in names}
    for r in range(args.repeats):
        for name in names:
            for loaded in (False, True):
                runs[name]["loaded" if loaded else "alone"].append(measure(SETTINGS[name], loaded, args))
                print(f"round {r}: {name}, {'loaded' if loaded else 'alone'}: "
                      f"{runs[name]['loaded' if loaded else 'alone'][-1]:.1f} images/s", flush=True)
    rows = []
    for name in names:
        alone, loaded = statistics.median(runs[name]["alone"]), statistics.median(runs[name]["loaded"])
        rows.append(dict(setting=name, env=SETTINGS[name], alone_images_per_s=round(alone, 1),
                         loaded_images_per_s=round(loaded, 1), slowdown=round(alone / loaded, 2),
                         runs={k: [round(v, 1) for v in vs] for k, vs in runs[name].items()}))
    print("\n| setting | alone (img/s) | beside a 2-thread load (img/s) | slowdown |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['alone_images_per_s']} | {row['loaded_images_per_s']} | {row['slowdown']}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(cpu=cpu(), steps=args.steps,
                                                  batch=args.batch, repeats=args.repeats, load=LOAD, rows=rows),
                                             indent=1))


if __name__ == "__main__":
    main()
