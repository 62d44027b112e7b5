"""Training throughput and model FLOPs utilisation (MFU) of the source base stage: our loop (`train()`) against a
plain diffusers loop of the same U-Net, same batch and precision, in one process, one after the other.

    python benchmarks/gpu_mfu.py --batch 512 --steps 60 --out runs/mfu.json   # on a GPU (bf16)

FLOPs per training image are counted once with torch.utils.flop_counter (forward + backward of the U-Net on one
batch; the optimizer and EMA are not counted), so MFU = images/s x FLOPs/image / peak. Peak: 989 TFLOP/s, the H100
SXM's dense bf16 figure (a measured 8192^3 bf16 matmul reaches ~800).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="cifar10")
    parser.add_argument("--data", default="pneumoniamnist")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from imagen_transfer.cascade import load_cascade
    from imagen_transfer.checkpoint import read_jsonl
    from imagen_transfer.config import load_config
    from imagen_transfer.train import train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda"
    stage = load_cascade(args.source).stages[0]
    unet = stage.unet.to(device)
    text_dim = unet.config.encoder_hid_dim
    flops = flops_per_image(unet, 8, stage.resolution, 32, text_dim, device)
    plain = plain_diffusers_loop(unet, args.batch, args.steps, stage.resolution, 32, text_dim, device, bf16)
    with tempfile.TemporaryDirectory() as tmp:
        log = max(1, args.steps // 3)
        config = load_config(None, [f"model.init_from={args.source}", f"data.dataset={args.data}",
                                    "data.val_split=val", "data.val_size=64", "transfer.method=full",
                                    "train.stages=[base]", f"train.steps={args.steps + log}",
                                    f"train.batch_size={args.batch}", f"train.log_every={log}", "train.val_every=0",
                                    "train.sample_every=0", "train.checkpoint_every=100000",
                                    f"train.mixed_precision={'bf16' if bf16 else 'no'}"])
        config.out = str(Path(tmp) / "run")
        train(config)
        rows = [r for r in read_jsonl(Path(tmp) / "run" / "metrics.jsonl") if "images_per_s" in r][1:]
        ours = sum(r["images_per_s"] for r in rows) / len(rows)
        peak_mb = max(r["peak_memory_mb"] for r in rows)
    result = dict(device=torch.cuda.get_device_name() if bf16 else "cpu", batch=args.batch,
                  precision="bf16" if bf16 else "fp32", resolution=stage.resolution,
                  parameters=sum(p.numel() for p in unet.parameters()), gflops_per_training_image=flops / 1e9,
                  ours_images_per_s=ours, plain_diffusers_images_per_s=plain, ratio_ours_to_plain=ours / plain,
                  ours_peak_memory_mb=peak_mb, ours_mfu=ours * flops / PEAK_BF16 if bf16 else None,
                  plain_mfu=plain * flops / PEAK_BF16 if bf16 else None)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
