"""Training memory of an IF-I-sized stage per transfer method, gradient checkpointing and precision, measured on the
CPU, and what it implies for IF-I-XL on a GPU.

    python benchmarks/memory.py --widths 192 256 --threads 1 --out benchmarks/results/memory_cpu.md

Each configuration runs in a fresh process (so its peak is its own): the IF-I-XL layout with its block widths
scaled (`unet.if_unet_config`; width 192 is IF-I-M-sized, 372M parameters) at 64 px, randomly initialised, text
states of T5-XXL's size (77 x 4096, as the caption cache feeds them), prepared by `transfer.prepare_transfer` and
trained by the loop's own step (`common.our_step`: AdamW, EMA, clipping) for `--steps` steps after one warm-up.
Peak memory is the resident set's high-water mark from the first step on (`memory.peak_memory_mb`), less the process's
resident set before the model was built (Python, torch and the libraries).

The arithmetic (per parameter): weights 4 bytes (2 for a frozen weight held in bf16: `train.frozen_dtype`), and per
trained parameter a gradient (4), AdamW's two moments (8) and the EMA copy (4); activations are what the measured
peak holds beyond that. At one resolution and layout, every activation tensor has a channel count proportional to
the width (feature maps, attention heads, text projections), so activations scale linearly with the width and
with the batch. The table checks that model on the second measured width (prediction from the first against the
measurement), then applies it to IF-I-XL's exact parameter counts per method (meta device) for the "fits on"
table. GPU figures add nothing for the CUDA context and allocator slack: the margins in that table are stated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import our_step, publish, timed_steps  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from imagen_transfer.cascade import Stage, training_scheduler  # noqa: E402
from imagen_transfer.config import TransferConfig, load_config  # noqa: E402
from imagen_transfer.memory import peak_memory_mb, reset_peak_memory  # noqa: E402
from imagen_transfer.step import Captioned  # noqa: E402
from imagen_transfer.text import TextEncoding  # noqa: E402
from imagen_transfer.transfer import prepare_transfer  # noqa: E402
from imagen_transfer.unet import if_unet_config, unet_parameters  # noqa: E402

STAGE = "if-i-xl"
METHODS = ["full", "freeze", "bitfit", "difffit", "lora"]
PRECISIONS = {"fp32": ("no", "fp32"), "bf16": ("bf16", "fp32"), "bf16+frozen": ("bf16", "bf16")}
TEXT_TOKENS, TEXT_DIM = 77, 4096
GPUS_GB = (24, 48, 80)


def transfer_config(method: str) -> TransferConfig:
    return TransferConfig(method=method, freeze_first_k=1 if method == "freeze" else 0)


def measure_one(spec: dict) -> dict:
    """One configuration in this process: peak memory above the process baseline, seconds per step."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec.get("device", "cpu"))
    baseline = resident_mb() if device.type == "cpu" else 0.0  # a GPU: allocated memory, none before the model
    torch.manual_seed(0)
    with device:  # built where it trains (IF-I-XL's random init on a CPU alone takes minutes)
        unet = UNet2DConditionModel(**if_unet_config(STAGE, spec["width"]))
    summary = prepare_transfer(unet, transfer_config(spec["method"]))
    stage = Stage("base", "base", 64, unet, training_scheduler())
    precision, frozen = PRECISIONS[spec["precision"]]
    config = load_config(None, [f"transfer.method={spec['method']}", f"train.batch_size={spec['batch']}",
                                f"train.steps={10**6}", f"train.mixed_precision={precision}",
                                f"train.frozen_dtype={frozen if spec['method'] != 'full' else 'fp32'}",
                                f"train.gradient_checkpointing={str(spec['checkpointing']).lower()}",
                                "train.lr=1e-5"])
    gen = torch.Generator().manual_seed(0)
    table = TextEncoding(torch.randn(2, TEXT_TOKENS, TEXT_DIM, generator=gen), torch.ones(2, TEXT_TOKENS),
                         torch.randn(2, TEXT_DIM, generator=gen))
    null = TextEncoding(torch.zeros(1, TEXT_TOKENS, TEXT_DIM), torch.ones(1, TEXT_TOKENS), torch.zeros(1, TEXT_DIM))
    images = torch.randint(0, 256, (8, 64, 64, 3), dtype=torch.uint8, generator=gen)
    step, t = our_step(config, None, stage, Captioned(images, torch.arange(8) % 2, table, []), null)
    reset_peak_memory(device)  # the peak of training (the model as the step holds it), not of building it in fp32
    times = timed_steps(step, 1, spec["steps"], device)
    return dict(spec, parameters=summary.total, trainable=summary.trainable, baseline_mb=baseline,
                peak_mb=peak_memory_mb(device) - baseline, seconds_per_step=sorted(times)[len(times) // 2])


def resident_mb() -> float:
    """The process's resident set now (Linux /proc)."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def static_mb(total: int, trainable: int, frozen_bytes: int, row_precision: str) -> float:
    """Memory the per-parameter arithmetic predicts: weights ((total - trainable) x frozen_bytes + trainable x 4),
    per trained parameter a gradient, AdamW's two moments and the EMA copy (16 bytes), and under bf16 autocast the
    bf16 copies autocast makes of every fp32 weight for the backward pass (2 bytes each). Gradient checkpointing
    does not remove those copies: measured, the remainder of a checkpointed bf16 run grows with the parameter
    count (1.6x from width 192 to 256, parameters 1.66x, width 1.33x), not with the width."""
    weights = (total - trainable) * frozen_bytes + trainable * 4
    states = trainable * 16
    fp32_weights = trainable + (total - trainable if frozen_bytes == 4 else 0)
    copies = 2 * fp32_weights if row_precision != "fp32" else 0
    return (weights + states + copies) / 2**20


def frozen_bytes(precision: str, method: str) -> int:
    return 2 if precision == "bf16+frozen" and method != "full" else 4


def row_static_mb(row: dict, total: int | None = None, trainable: int | None = None) -> float:
    return static_mb(total or row["parameters"], trainable or row["trainable"],
                     frozen_bytes(row["precision"], row["method"]), row["precision"])


def activation_mb(row: dict) -> float:
    """What the measured peak holds beyond the per-parameter arithmetic."""
    return row["peak_mb"] - row_static_mb(row)


def xl_counts() -> dict[str, tuple[int, int]]:
    """IF-I-XL's (total, trainable) per method, on the meta device."""
    counts = {}
    for method in METHODS:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**if_unet_config(STAGE))
            summary = prepare_transfer(unet, transfer_config(method))
        counts[method] = (summary.total, summary.trainable)
        del unet
    return counts


def report(rows: list[dict], args) -> str:
    base_w, check_w = args.widths[0], args.widths[-1]
    by = {(r["width"], r["method"], r["checkpointing"], r["precision"]): r for r in rows}
    lines = [f"# Training memory of the IF-I-XL layout at 64 px, measured on the CPU (batch {args.batch}, "
             f"{args.threads} thread(s), {args.steps} timed steps after one warm-up)", "",
             f"Widths measured: {', '.join(str(w) for w in args.widths)} "
             f"({', '.join(f'{unet_parameters(if_unet_config(STAGE, w)) / 1e6:.0f}M' for w in args.widths)} "
             "parameters; IF-I-XL is width 704, 4.30B). Peak: resident-set high-water mark of the training process "
             "above its own baseline. Activations: peak less weights, gradients, AdamW moments and EMA "
             "(the per-parameter arithmetic in the script's docstring). s/step is one step's wall time: on a machine "
             "shared with other work it is indicative only (the memory figures are not affected).", "",
             "| width | method | trainable | checkpointing | precision | peak MB | activations MB | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['method']} | {100 * r['trainable'] / r['parameters']:.2f}% | "
                     f"{'on' if r['checkpointing'] else 'off'} | {r['precision']} | {r['peak_mb']:,.0f} | "
                     f"{activation_mb(r):,.0f} | {r['seconds_per_step']:.2f} |")
    lines += ["", "## Gradient checkpointing: saving and cost, from the same runs", "",
              "| width | method | precision | peak off / on | activations off / on | step time on / off |",
              "|---|---|---|---|---|---|"]
    for (w, m, ck, p), r in by.items():
        if ck or (w, m, True, p) not in by:
            continue
        on = by[(w, m, True, p)]
        lines.append(f"| {w} | {m} | {p} | {r['peak_mb'] / on['peak_mb']:.2f}x | "
                     f"{activation_mb(r) / max(activation_mb(on), 1):.2f}x | "
                     f"{on['seconds_per_step'] / r['seconds_per_step']:.2f}x |")
    if check_w != base_w:
        lines += ["", f"## The extrapolation checked: width {check_w} predicted from width {base_w}", "",
                  "| method | checkpointing | precision | predicted peak MB | measured peak MB | error |",
                  "|---|---|---|---|---|---|"]
        for (w, m, ck, p), r in by.items():
            if w != check_w or (base_w, m, ck, p) not in by:
                continue
            base = by[(base_w, m, ck, p)]
            predicted = row_static_mb(r) + activation_mb(base) * check_w / base_w
            lines.append(f"| {m} | {'on' if ck else 'off'} | {p} | {predicted:,.0f} | {r['peak_mb']:,.0f} | "
                         f"{100 * (predicted - r['peak_mb']) / r['peak_mb']:+.1f}% |")
    lines += ["", "## IF-I-XL at 64 px: what fits (batch 1, T5 states cached, from the arithmetic above)", "",
              f"Activations scaled linearly from width {base_w} to 704 (x{704 / base_w:.2f}); static memory from "
              "IF-I-XL's exact counts per method. A GPU also holds the CUDA context and allocator slack (about "
              "1-2 GB): a row fits a card when its total is below the card's memory less 2 GB.", "",
              "| method | trainable | checkpointing | precision | static GB | activations GB | total GB | fits "
              + " | ".join(f"{g} GB" for g in GPUS_GB) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(GPUS_GB)]
    xl = xl_counts()
    for (w, m, ck, p), r in by.items():
        if w != base_w:
            continue
        total, trainable = xl[m]
        static = row_static_mb(r, total, trainable) / 1024
        act = activation_mb(r) * 704 / base_w / 1024 * args.batch / r["batch"]
        fits = " | ".join("yes" if static + act <= g - 2 else "no" for g in GPUS_GB)
        lines.append(f"| {m} | {100 * trainable / total:.2f}% | {'on' if ck else 'off'} | {p} | {static:.1f} | "
                     f"{act:.1f} | {static + act:.1f} | {fits} |")
    full_static = static_mb(*xl["full"], 4, "fp32") / 1024
    lines += ["", f"Full fine-tuning holds {full_static:.0f} GB of weights, gradients, AdamW moments and EMA before "
              "any activation: no single GPU above fits it. Sharded over 8 GPUs (FSDP / ZeRO-3: every per-parameter "
              f"state split 8 ways) that is {full_static / 8:.1f} GB per GPU plus one GPU's activations.", "",
              f"Command: `python benchmarks/memory.py --widths {' '.join(map(str, args.widths))} --batch {args.batch} "
              f"--steps {args.steps} --threads {args.threads}`"]
    return "\n".join(lines) + "\n"


def plan(args) -> list[dict]:
    """Every method x checkpointing x precision at the first width; a cross-section at the others."""
    specs = []
    for w in args.widths:
        for m in METHODS if w == args.widths[0] else ["full", "lora"]:
            for ck in (False, True):
                for p in PRECISIONS:
                    if m == "full" and p == "bf16+frozen":
                        continue  # nothing is frozen
                    specs.append(dict(width=w, method=m, checkpointing=ck, precision=p, batch=args.batch,
                                      steps=args.steps, threads=args.threads))
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[192, 256])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=None, help="only these (default: all at the first width)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=list(PRECISIONS), help="only these")
    parser.add_argument("--checkpointing", nargs="+", default=None, choices=["off", "on"], help="only these")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: peak allocated GPU memory instead of RSS")
    parser.add_argument("--rows", type=Path, default=None, help="jsonl of measured rows: appended to, and reused")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one configuration
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(measure_one(json.loads(args.one))), flush=True)
        return
    rows_file = args.rows or (args.out.with_suffix(".jsonl") if args.out else None)
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file and rows_file.exists() else []
    done = {json.dumps({k: r[k] for k in ("width", "method", "checkpointing", "precision", "batch")}) for r in rows}
    started = time.time()
    for spec in plan(args):
        if (args.methods and spec["method"] not in args.methods
                or args.precisions and spec["precision"] not in args.precisions
                or args.checkpointing and ("on" if spec["checkpointing"] else "off") not in args.checkpointing):
            continue
        spec["device"] = args.device
        key = json.dumps({k: spec[k] for k in ("width", "method", "checkpointing", "precision", "batch")})
        if key in done:
            continue
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("ROW ")), None)
        if line is None:
            raise SystemExit(f"configuration {spec} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(line[4:]))
        print(f"{time.time() - started:6.0f}s {rows[-1]}", flush=True)
        if rows_file:
            with rows_file.open("a") as f:
                f.write(line[4:] + "\n")
    publish(report(rows, args), args.out)


if __name__ == "__main__":
    main()
