"""Training images/s of each stage: our training step against a plain diffusers loop, same U-Net, one run.

The plain loop is what the diffusers training examples do (add_noise, forward, MSE on eps, backward, AdamW; fp32, fed
the cached caption states; `common.plain_diffusers_step`); ours is `step.training_step` with its defaults (see
benchmarks/peers.py for each lever alone), which adds min-SNR weighting, condition dropout, SR noise augmentation,
gradient clipping, EMA and accelerate. Both start from the same weights, use the same batch size and threads, and
alternate (plain, ours, plain, ours, ...) so a noisy machine affects both alike. Reported: median images/s of each
and their ratio.

    python benchmarks/train_throughput.py --preset small --steps 12 --repeats 2 --out benchmarks/results/train_throughput_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_images_per_s, our_step, plain_diffusers_step, publish, timed_steps  # noqa: E402

from imagen_transfer.cascade import init_cascade  # noqa: E402
from imagen_transfer.config import load_config  # noqa: E402
from imagen_transfer.step import Captioned  # noqa: E402
from imagen_transfer.text import load_text_encoder  # noqa: E402


def _fresh(stage):
    copied = copy.copy(stage)
    copied.unet = copy.deepcopy(stage.unet)
    return copied


def plain_images_per_s(stage, images, text, steps: int, batch: int) -> float:
    step, _ = plain_diffusers_step(_fresh(stage), images, text, torch.arange(len(images)) % len(text.states), batch)
    return median_images_per_s(timed_steps(step, 1, steps), batch)


def our_images_per_s(stage, images, text, null, steps: int, batch: int, cascade) -> float:
    config = load_config(None, [f"train.steps={steps + 1}", f"train.batch_size={batch}"])
    data = Captioned(images, torch.arange(len(images)) % len(text.states), text, [])
    step, _ = our_step(config, cascade, _fresh(stage), data, null)
    return median_images_per_s(timed_steps(step, 1, steps), batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cascade = init_cascade(args.preset, max_text_length=32 if args.preset != "tiny" else 20)
    encoder = load_text_encoder(cascade.text_encoder)
    text = encoder([f"a photo of a {c}" for c in ("cat", "dog", "ship", "truck")])
    null = encoder([""])
    images = torch.randint(0, 256, (512, cascade.resolution, cascade.resolution, 3), dtype=torch.uint8)
    lines = [f"# Training throughput, preset `{args.preset}`, batch {args.batch}, {args.threads} threads, "
             f"{args.steps} timed steps x {args.repeats} alternating repeats", "",
             f"device: CPU ({torch.get_num_threads()} threads), torch {torch.__version__}", "",
             "| stage | resolution | parameters | plain diffusers loop (img/s) | imagen-transfer training_step (img/s) | ratio |",
             "|---|---|---|---|---|---|"]
    for stage in cascade.stages:
        plain, ours = [], []
        for _ in range(args.repeats):
            plain.append(plain_images_per_s(stage, images, text, args.steps, args.batch))
            ours.append(our_images_per_s(stage, images, text, null, args.steps, args.batch, cascade))
        p, o = statistics.median(plain), statistics.median(ours)
        params = sum(x.numel() for x in stage.unet.parameters()) / 1e6
        lines.append(f"| {stage.name} | {stage.resolution}px | {params:.2f}M | {p:.1f} | {o:.1f} | {o / p:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", f"runs: plain {[round(v, 1) for v in plain]}, ours {[round(v, 1) for v in ours]} (last stage)"]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
