"""Training images/s of each stage: our `train_stage` loop against a plain diffusers loop, same U-Net, one run.

The plain loop is what the diffusers training examples do (add_noise, forward, MSE on eps, backward, AdamW; fp32, fed
the cached caption states); ours runs with its defaults (see benchmarks/peers.py for each lever alone) and adds
min-SNR weighting, condition dropout, SR noise augmentation, gradient clipping, EMA and accelerate. Both start
from the same weights, use the same batch size and threads, and alternate (plain, ours, plain, ours, ...) so a
noisy machine affects both alike. Reported: median images/s of each and their ratio.

    python benchmarks/train_throughput.py --preset small --steps 12 --repeats 2 --out benchmarks/results/train_throughput_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from imagen_transfer.cascade import init_cascade
from imagen_transfer.checkpoint import read_jsonl
from imagen_transfer.config import load_config
from imagen_transfer.data import to_float
from imagen_transfer.diffusion import upsample
from imagen_transfer.text import load_text_encoder
from imagen_transfer.train import Captioned, train_stage


def plain_diffusers_loop(stage, images, text, steps: int, batch: int) -> float:
    """images/s of the textbook diffusers loop on the same U-Net (timed after one warm-up step)."""
    unet = copy.deepcopy(stage.unet).train()
    scheduler = stage.scheduler
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    start = None
    for step in range(steps + 1):
        if step == 1:
            start = time.perf_counter()
        idx = torch.randint(0, len(images), (batch,))
        x0 = to_float(images[idx], stage.resolution)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        model_in = scheduler.add_noise(x0, noise, t)
        class_labels = None
        if stage.kind == "sr":
            low = torch.nn.functional.interpolate(x0, size=stage.lowres, mode="area")
            model_in = torch.cat([model_in, upsample(low, stage.resolution)], 1)
            class_labels = torch.randint(0, 500, (batch,))
        pred = unet(model_in, t, encoder_hidden_states=text.states[idx % len(text.states)],
                    encoder_attention_mask=text.mask[idx % len(text.states)], class_labels=class_labels).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - start)


def our_loop(stage, images, text, null, steps: int, batch: int, cascade) -> float:
    """images/s of `train_stage` over its last `steps` steps (one warm-up step first)."""
    config = load_config(None, [f"train.steps={steps + 1}", f"train.batch_size={batch}", f"train.log_every={steps + 1}",
                                "train.val_every=0", "train.sample_every=0", f"train.checkpoint_every={10 ** 9}"])
    st = copy.copy(stage)
    st.unet = copy.deepcopy(stage.unet)
    data = Captioned(images, torch.arange(len(images)) % len(text.states), text, [])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train_stage(config, cascade, st, data, data, null, Path(tmp), encode=None)
        total = time.perf_counter() - start
        rows = [r for r in read_jsonl(Path(tmp) / "metrics.jsonl") if "images_per_s" in r]
    return rows[-1]["images_per_s"] if rows else (steps + 1) * batch / total


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
             "| stage | resolution | parameters | plain diffusers loop (img/s) | imagen-transfer train_stage (img/s) | ratio |",
             "|---|---|---|---|---|---|"]
    for stage in cascade.stages:
        plain, ours = [], []
        for _ in range(args.repeats):
            plain.append(plain_diffusers_loop(stage, images, text, args.steps, args.batch))
            ours.append(our_loop(stage, images, text, null, args.steps, args.batch, cascade))
        p, o = statistics.median(plain), statistics.median(ours)
        params = sum(x.numel() for x in stage.unet.parameters()) / 1e6
        lines.append(f"| {stage.name} | {stage.resolution}px | {params:.2f}M | {p:.1f} | {o:.1f} | {o / p:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", f"runs: plain {[round(v, 1) for v in plain]}, ours {[round(v, 1) for v in ours]} (last stage)"]
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text_out)


if __name__ == "__main__":
    main()
