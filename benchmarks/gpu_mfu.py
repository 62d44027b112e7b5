"""Training throughput and model FLOPs utilisation (MFU) of the source base stage: our training step
(`step.training_step`, what the loop runs) against the plain diffusers loop (`common.plain_diffusers_step`) on the
same U-Net, same batch and precision, fed the same random images and caption states, in one process.

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
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import our_step, plain_diffusers_step, timed_steps  # noqa: E402

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


VARIANTS = {  # our loop's levers for a GPU, as config overrides
    "eager": [],
    "channels_last": ["train.channels_last=true"],
    "compile": ["train.compile=true"],
    "cuda_graphs": ["train.compile=true", "train.compile_mode=reduce-overhead"],
}


def inputs(stage, batch: int, text_dim: int):
    """Random uint8 images and 8 random caption encodings of 32 tokens: throughput does not depend on content."""
    from imagen_transfer.text import TextEncoding

    images = torch.randint(0, 256, (max(4 * batch, 64), stage.resolution, stage.resolution, 3), dtype=torch.uint8)
    states = torch.randn(8, 32, text_dim)
    table = TextEncoding(states, torch.ones(8, 32, dtype=torch.long), states.mean(1))
    return images, table, torch.arange(len(images)) % 8


def plain_images_per_s(stage, batch: int, steps: int, text_dim: int, device, bf16: bool) -> float:
    """images/s of the plain diffusers loop after 10 warm-up steps."""
    images, table, ids = inputs(stage, batch, text_dim)
    step, _ = plain_diffusers_step(stage, images, table, ids, batch, bf16=bf16, device=device)
    return batch * steps / sum(timed_steps(step, 10, steps, device))


def our_images_per_s(stage, cascade, batch: int, steps: int, text_dim: int, device, variant: str,
                     bf16: bool) -> tuple[float, float]:
    """images/s of our step after 10 warm-up steps (compilation included there) and the peak memory in MB."""
    from imagen_transfer.config import load_config
    from imagen_transfer.memory import peak_memory_mb, reset_peak_memory
    from imagen_transfer.step import Captioned

    images, table, ids = inputs(stage, batch, text_dim)
    config = load_config(None, ["transfer.method=full", f"train.steps={steps + 10}", f"train.batch_size={batch}",
                                f"train.mixed_precision={'bf16' if bf16 else 'no'}", *VARIANTS[variant]])
    null = table.index(slice(0, 1))
    reset_peak_memory(device)
    step, _ = our_step(config, cascade, stage, Captioned(images, ids, table, []), null)
    seconds = sum(timed_steps(step, 10, steps, device))
    return batch * steps / seconds, peak_memory_mb(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="cifar10", help="fine-tune this cascade's base stage")
    parser.add_argument("--preset", default=None, help="instead: train a fresh cascade preset's base stage (base64)")
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
        model = f"model.preset={args.preset}"
    else:
        cascade, model = load_cascade(args.source), f"model.init_from={args.source}"
    stage = cascade.stages[0]
    unet = stage.unet.to(device)
    text_dim, resolution = unet.config.encoder_hid_dim, stage.resolution
    parameters = sum(p.numel() for p in unet.parameters())
    flops = flops_per_image(unet, 8, resolution, 32, text_dim, device)
    initial = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    plain = plain_images_per_s(stage, args.batch, args.steps, text_dim, device, bf16)
    mfu = (lambda images_per_s: images_per_s * flops / PEAK_BF16) if bf16 else (lambda _: None)
    result = dict(device=torch.cuda.get_device_name() if bf16 else "cpu", batch=args.batch,
                  precision="bf16" if bf16 else "fp32", model=model, resolution=resolution,
                  parameters=parameters, gflops_per_training_image=flops / 1e9,
                  plain_diffusers_images_per_s=plain, plain_mfu=mfu(plain), ours={})
    for variant in args.variants:  # written after each variant: a device call cut short keeps what it measured
        try:
            stage.unet.load_state_dict(initial)  # every variant starts from the same weights
            ips, mb = our_images_per_s(stage, cascade, args.batch, args.steps, text_dim, device, variant, bf16)
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
