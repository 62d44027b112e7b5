"""Training throughput and model FLOPs utilisation (MFU) of the source base stage: our loop (`train()`) against a
plain diffusers loop of the same U-Net, same batch and precision, in one process, one after the other.

    python benchmarks/gpu_mfu.py --batch 512 --steps 60 --variants eager compile cuda_graphs --out runs/mfu.json
    python benchmarks/gpu_mfu.py --preset base64 --batch 128 --variants eager cuda_graphs   # a GPU-sized 64 px stage

Each variant of our loop is a config override (`VARIANTS`): eager bf16, channels_last, torch.compile, and
torch.compile's reduce-overhead mode, which replays the training step as CUDA graphs (the lever for a small stage
whose step is bound by kernel launches).

FLOPs per training image are counted once with torch.utils.flop_counter (forward + backward of the U-Net on one
batch; the optimizer and EMA are not counted), so MFU = images/s x FLOPs/image / peak. Peak: 989 TFLOP/s, the H100
SXM's dense bf16 figure (a measured 8192^3 bf16 matmul reaches ~800).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

PEAK_BF16 = 989e12


def flops_per_image(unet, batch: int, resolution: int, text_len: int, text_dim: int, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, unet.config.in_channels, resolution, resolution, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    text = torch.randn(batch, text_len, text_dim, device=device)
    with FlopCounterMode(display=False) as counter:
        out = unet(x, t, encoder_hidden_states=text).sample
        out.float().pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def plain_diffusers_loop(unet, batch: int, steps: int, resolution: int, text_len: int, text_dim: int, device,
                         bf16: bool) -> float:
    """The loop of diffusers' train_text_to_image example, reduced to the U-Net: images/s after 10 warm-up steps."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    x0 = torch.randn(batch, unet.config.in_channels, resolution, resolution, device=device)
    text = torch.randn(batch, text_len, text_dim, device=device)
    unet.train()
    for i in range(steps + 10):
        if i == 10:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


VARIANTS = {  # our loop's levers for a GPU, as config overrides
    "eager": [],
    "channels_last": ["train.channels_last=true"],
    "compile": ["train.compile=true"],
    "cuda_graphs": ["train.compile=true", "train.compile_mode=reduce-overhead"],
}


def our_loop(args, model: list[str], variant: str, bf16: bool) -> tuple[float, float]:
    """images/s (mean over the log windows after the first, which holds warm-up and compilation) and peak MB."""
    from imagen_transfer.checkpoint import read_jsonl
    from imagen_transfer.config import load_config
    from imagen_transfer.train import train

    with tempfile.TemporaryDirectory() as tmp:
        log = max(1, args.steps // 3)
        config = load_config(None, [*model, f"data.dataset={args.data}", "data.val_split=val", "data.val_size=64",
                                    "transfer.method=full", "train.stages=[base]", f"train.steps={args.steps + log}",
                                    f"train.batch_size={args.batch}", f"train.log_every={log}", "train.val_every=0",
                                    "train.sample_every=0", "train.checkpoint_every=100000",
                                    f"train.mixed_precision={'bf16' if bf16 else 'no'}", *VARIANTS[variant]])
        config.out = str(Path(tmp) / "run")
        train(config)
        rows = [r for r in read_jsonl(Path(tmp) / "run" / "metrics.jsonl") if "images_per_s" in r][1:]
        return sum(r["images_per_s"] for r in rows) / len(rows), max(r["peak_memory_mb"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="cifar10", help="fine-tune this cascade's base stage")
    parser.add_argument("--preset", default=None, help="instead: train a fresh cascade preset's base stage (base64)")
    parser.add_argument("--data", default="pneumoniamnist")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--variants", nargs="+", default=["eager"], choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from imagen_transfer.cascade import init_cascade, load_cascade

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda"
    if args.preset:
        cascade = init_cascade(args.preset, max_text_length=32)  # the caption cache's length: no encoder needed
        stage, model = cascade.stages[0], [f"model.preset={args.preset}", "model.max_text_length=32"]
    else:
        stage, model = load_cascade(args.source).stages[0], [f"model.init_from={args.source}"]
    unet = stage.unet.to(device)
    text_dim, resolution = unet.config.encoder_hid_dim, stage.resolution
    parameters = sum(p.numel() for p in unet.parameters())
    flops = flops_per_image(unet, 8, resolution, 32, text_dim, device)
    plain = plain_diffusers_loop(unet, args.batch, args.steps, resolution, 32, text_dim, device, bf16)
    del unet, stage
    mfu = (lambda images_per_s: images_per_s * flops / PEAK_BF16) if bf16 else (lambda _: None)
    result = dict(device=torch.cuda.get_device_name() if bf16 else "cpu", batch=args.batch,
                  precision="bf16" if bf16 else "fp32", model=model[0], resolution=resolution,
                  parameters=parameters, gflops_per_training_image=flops / 1e9,
                  plain_diffusers_images_per_s=plain, plain_mfu=mfu(plain), ours={})
    for variant in args.variants:  # written after each variant: a device call cut short keeps what it measured
        try:
            ips, mb = our_loop(args, model, variant, bf16)
            result["ours"][variant] = dict(images_per_s=ips, ratio_to_plain=ips / plain, peak_memory_mb=mb,
                                           mfu=mfu(ips))
        except Exception as err:  # a lever that fails here (a compiler error) must not take the others with it
            traceback.print_exc()
            result["ours"][variant] = dict(error=f"{type(err).__name__}: {err}"[:500])
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))

if __name__ == "__main__":
    main()
