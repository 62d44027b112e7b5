"""Our stages against the peers, in one run: training and sampling images/s and step memory, printed as ratios.

Contenders, all on the base stage of the `small` preset (16 px; ours 6.5M parameters) with the same batch, threads
and MiniLM caption states (32 tokens x 384):

- `ours`: `step.training_step` (what `train_stage` runs each step) with its defaults (cached caption states, autocast precision `auto`, fused AdamW, EMA,
  min-SNR weighting, condition dropout, gradient clipping, accelerate), and `ours-fp32` (`mixed_precision=no`);
- `ours-freeze`: the same with the stem and the first two down blocks frozen (`transfer.method=freeze`,
  `freeze_first_k=2`), against `ours` (full fine-tuning) for the frozen-early target; `ours-freeze3`: all three
  down blocks (the whole encoder half) frozen;
- `plain`: the loop of diffusers' text-to-image training example on the same U-Net: the frozen text encoder runs
  on each batch's captions, fp32, `torch.optim.AdamW` with its defaults, MSE on eps; `plain-cached` feeds the cached
  caption states instead; `plain-bf16` adds our loop's levers (bf16 autocast, fused AdamW, the math attention kernel
  on a CPU) without its extras, so `ours / plain-bf16` is what EMA, min-SNR, dropout, clipping and accelerate cost
  (all three `plain` variants are `common.plain_diffusers_step`);
- `imagen-pytorch`: lucidrains' `Unet` + `Imagen` of the same size (dim 64, mults 1-2-2, one ResNet block per level,
  attention and cross-attention at the two lower levels, 4 heads x 32), fed the caption states directly
  (`text_embeds`), fp32 as its trainer runs on a CPU; `imagen-pytorch-bf16` under bf16 autocast.

imagen-pytorch imports torchvision (for PIL conversions only) and reads a T5 config from the hub for a default
argument; neither is available offline beside this torch, so `_import_imagen_pytorch` stubs torchvision/datasets
and pre-fills its T5 config table (d_model 768, unused: `text_embed_dim=384` is passed). Install it without its
dependencies: `pip install --no-deps imagen-pytorch==2.1.0 && pip install beartype einops ema-pytorch kornia
pytorch-warmup`.

Each (contender, repeat) runs in a fresh spawned process, in alternating order (every contender once, then again),
so a noisy machine affects all alike and each process's memory is its own. Images/s is the median over the timed
steps after warm-up; step memory is the process's peak resident set above its resident set just before the first
step (activations, gradients, optimizer state). Sampling: 25 steps, guidance 3, `--sample-batch` images.

    python benchmarks/peers.py --out benchmarks/results/peers_cpu.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import our_step, plain_diffusers_step, publish, timed_steps  # noqa: E402

from imagen_transfer.memory import peak_memory_mb  # noqa: E402
from imagen_transfer.openmp import cpu  # noqa: E402

TRAIN = ("ours", "ours-fp32", "ours-freeze", "ours-freeze3", "plain", "plain-cached", "plain-bf16", "imagen-pytorch",
         "imagen-pytorch-bf16")
SAMPLE = ("ours", "ours-bf16", "plain", "imagen-pytorch")
CAPTIONS = [f"a photo of a {c}" for c in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                          "ship", "truck")]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return peak_memory_mb(torch.device("cpu"))  # the resident-set high-water mark, as train_stage logs it


def _import_imagen_pytorch():
    """imagen-pytorch's Unet and Imagen, importable offline beside torch 2.13 (see the module docstring)."""
    import importlib.machinery
    import importlib.util
    import sys
    import types

    import transformers

    def stub(name, **attrs):
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module
        return module

    stub("torchvision", transforms=stub("torchvision.transforms"))
    file_utils = stub("datasets.utils.file_utils", get_datasets_user_agent=lambda: "")
    stub("datasets", utils=stub("datasets.utils", file_utils=file_utils))
    spec = importlib.util.find_spec("imagen_pytorch")
    if spec is None:
        raise SystemExit("imagen-pytorch is not installed: pip install --no-deps imagen-pytorch==2.1.0 && "
                         "pip install beartype einops ema-pytorch kornia pytorch-warmup")
    t5_spec = importlib.util.spec_from_file_location("imagen_pytorch.t5",
                                                     Path(spec.origin).parent / "t5.py")
    t5 = importlib.util.module_from_spec(t5_spec)
    t5_spec.loader.exec_module(t5)
    sys.modules["imagen_pytorch.t5"] = t5
    t5.T5_CONFIGS[t5.DEFAULT_T5_NAME] = dict(config=transformers.T5Config(d_model=768))
    from imagen_pytorch import Imagen, Unet

    return Unet, Imagen


def _imagen_pytorch(resolution: int, timesteps: int = 1000):
    Unet, Imagen = _import_imagen_pytorch()
    unet = Unet(dim=64, dim_mults=(1, 2, 2), num_resnet_blocks=1, layer_attns=(False, True, True),
                layer_cross_attns=(False, True, True), attn_heads=4, attn_dim_head=32, text_embed_dim=384)
    return Imagen(unets=(unet,), image_sizes=(resolution,), text_embed_dim=384, timesteps=timesteps,
                  cond_drop_prob=0.1, channels=3)


def _setup(threads: int, preset: str):
    from imagen_transfer.cascade import init_cascade
    from imagen_transfer.text import load_text_encoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cascade = init_cascade(preset, max_text_length=32)
    encoder = load_text_encoder(cascade.text_encoder)
    return cascade, encoder


def _timed_steps(step, warmup: int, steps: int) -> tuple[float, float]:
    """Median seconds per call of `step` after `warmup` calls, and the peak RSS above the RSS before the first."""
    before = _rss_mb()
    return statistics.median(timed_steps(step, warmup, steps)), _peak_mb() - before


def train_worker(name: str, args: dict) -> dict:
    """One contender's training images/s and step memory, in this (fresh) process."""
    cascade, encoder = _setup(args["threads"], args["preset"])
    stage, batch = cascade.stages[0], args["batch"]
    images = torch.randint(0, 256, (512, stage.resolution, stage.resolution, 3), dtype=torch.uint8)
    caption_ids = torch.arange(512) % len(CAPTIONS)
    table, null = encoder(CAPTIONS), encoder([""])

    if name.startswith("ours"):
        from imagen_transfer.config import load_config
        from imagen_transfer.step import Captioned
        from imagen_transfer.transfer import prepare_transfer

        overrides = [f"train.steps={args['warmup'] + args['steps']}", f"train.batch_size={batch}"]
        if name == "ours-fp32":
            overrides.append("train.mixed_precision=no")
        if name.startswith("ours-freeze"):
            overrides += ["transfer.method=freeze", f"transfer.freeze_first_k={3 if name == 'ours-freeze3' else 2}"]
        config = load_config(None, overrides)
        prepare_transfer(stage.unet, config.transfer)
        step, state = our_step(config, cascade, stage, Captioned(images, caption_ids, table, []), null)
        params = state.raw_unet.parameters()
    elif name.startswith("imagen-pytorch"):
        from imagen_transfer.data import to_float

        bf16 = name.endswith("-bf16")
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
        imagen = _imagen_pytorch(stage.resolution).train()
        params = [p for p in imagen.unets[0].parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=bf16 or None)

        def step(i):
            idx = torch.randint(0, len(images), (batch,))
            x = to_float(images[idx]) * 0.5 + 0.5  # imagen-pytorch takes images in [0, 1]
            text = table.index(caption_ids[idx])
            with autocast:
                loss = imagen(x, text_embeds=text.states, text_masks=text.mask.bool(), unet_number=1)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    else:  # plain, plain-cached, plain-bf16: the shared plain diffusers loop
        step, params = plain_diffusers_step(stage, images, table, caption_ids, batch, bf16=name == "plain-bf16",
                                            encode=encoder if name == "plain" else None, captions=list(CAPTIONS))

    seconds, memory = _timed_steps(step, args["warmup"], args["steps"])
    return dict(images_per_s=batch / seconds, step_memory_mb=memory, parameters=sum(p.numel() for p in params))


def sample_worker(name: str, args: dict) -> dict:
    """One contender's sampling images/s (25 steps, guidance 3) in this (fresh) process."""
    cascade, encoder = _setup(args["threads"], args["preset"])
    stage, n = cascade.stages[0], args["sample_batch"]
    text, null = encoder([CAPTIONS[i % len(CAPTIONS)] for i in range(n)]), encoder([""])
    if name.startswith("ours"):
        from imagen_transfer.sampling import sample_stage

        precision = "bf16" if name == "ours-bf16" else "no"  # sampling's default is fp32

        def run(i):
            gens = [torch.Generator().manual_seed(k) for k in range(n)]
            sample_stage(stage, text, null, gens, steps=25, guidance=3.0, progress=False, precision=precision)
    elif name == "plain":  # diffusers' pipeline loop: DPM-Solver++, cond and uncond in one batch, no thresholding
        from diffusers import DPMSolverMultistepScheduler

        scheduler = DPMSolverMultistepScheduler.from_config(stage.scheduler.config)
        states = torch.cat([text.states, null.states.expand(n, -1, -1)])
        mask = torch.cat([text.mask, null.mask.expand(n, -1)])
        unet = stage.unet.eval()

        @torch.no_grad()
        def run(i):
            scheduler.set_timesteps(25)
            x = torch.randn(n, stage.channels, stage.resolution, stage.resolution)
            for t in scheduler.timesteps:
                out = unet(torch.cat([x, x]), t, encoder_hidden_states=states, encoder_attention_mask=mask).sample
                cond, uncond = out.chunk(2)
                x = scheduler.step(uncond + 3.0 * (cond - uncond), t, x).prev_sample
    else:
        imagen = _imagen_pytorch(stage.resolution, timesteps=25).eval()

        @torch.no_grad()
        def run(i):
            imagen.sample(text_embeds=text.states, text_masks=text.mask.bool(), cond_scale=3.0, use_tqdm=False)
    seconds, memory = _timed_steps(run, 1, args["sample_repeats"])
    return dict(images_per_s=n / seconds, step_memory_mb=memory)


def _worker(task: str, name: str, args: dict, queue) -> None:
    try:
        queue.put((train_worker if task == "train" else sample_worker)(name, args))
    except Exception as err:  # reported in the table, not hidden
        queue.put(dict(error=f"{type(err).__name__}: {err}"))


def measure(task: str, name: str, args: dict) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=_worker, args=(task, name, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def _summary(values: list[dict], key: str) -> float | None:
    good = [v[key] for v in values if key in v]
    return statistics.median(good) if good else None


def table(results: dict, names: tuple, reference: str, title: str) -> list[str]:
    ref = _summary(results[reference], "images_per_s")
    lines = [f"### {title}", "", "| contender | images/s (median of repeats) | repeats | step memory (MB) | "
             "ours / contender | parameters |", "|---|---|---|---|---|---|"]
    for name in names:
        runs = results[name]
        errors = [r["error"] for r in runs if "error" in r]
        speed = _summary(runs, "images_per_s")
        if speed is None:
            lines.append(f"| {name} | failed: {errors[0]} | | | | |")
            continue
        params = _summary(runs, "parameters")
        each = ", ".join(f"{r['images_per_s']:.1f}" for r in runs if "error" not in r)
        lines.append(f"| {name} | {speed:.1f} | {each}"
                     f" | {_summary(runs, 'step_memory_mb'):.0f} | {ref / speed:.2f}x | "
                     f"{'' if params is None else f'{params / 1e6:.2f}M'} |")
    return lines


# Each contender family at one precision: (ours, plain diffusers, imagen-pytorch) contenders, for equal_precision.
PRECISION_ROWS = {"fp32": ("ours-fp32", ("plain-cached", "plain"), ("imagen-pytorch",)),
                  "bf16": ("ours", ("plain-bf16",), ("imagen-pytorch-bf16",))}


def equal_precision(results: dict) -> list[str]:
    """Ratios at equal precision (ours against each peer at the same autocast setting) and best against best (each
    side at whichever precision is fastest for it on this machine): not our best against another's default."""
    speed = {n: _summary(r, "images_per_s") for n, r in results.items()}
    lines = ["", "### At equal precision, and best against best", "",
             "| precision | ours | plain diffusers (best of its configurations) | ours / plain | imagen-pytorch | "
             "ours / imagen-pytorch |", "|---|---|---|---|---|---|"]
    best = {}
    for precision, (ours, plains, imagens) in PRECISION_ROWS.items():
        o = speed.get(ours)
        p = max((speed[n] for n in plains if speed.get(n)), default=None)
        i = max((speed[n] for n in imagens if speed.get(n)), default=None)
        for side, value in (("ours", o), ("plain", p), ("imagen", i)):
            if value and value > best.get(side, (0, ""))[0]:
                best[side] = (value, precision)
        cells = [f"{v:.1f}" if v else "-" for v in (o, p)] + [f"{o / p:.2f}x" if o and p else "-"]
        cells += [f"{i:.1f}" if i else "-", f"{o / i:.2f}x" if o and i else "-"]
        lines.append(f"| {precision} | " + " | ".join(cells) + " |")
    if {"ours", "plain", "imagen"} <= set(best):
        (o, op), (p, pp), (i, ip) = best["ours"], best["plain"], best["imagen"]
        lines.append(f"| best of each | {o:.1f} ({op}) | {p:.1f} ({pp}) | **{o / p:.2f}x** | {i:.1f} ({ip}) | "
                     f"**{o / i:.2f}x** |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per process")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (oneDNN builds its bf16 kernels)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-batch", type=int, default=32)
    parser.add_argument("--sample-repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train", default=",".join(TRAIN), help="comma-separated contenders, or none")
    parser.add_argument("--sample", default=",".join(SAMPLE), help="comma-separated contenders, or none")
    parser.add_argument("--out", default=None, help="markdown table (a .json beside it holds every run)")
    args = parser.parse_args()
    train_names = tuple(n for n in args.train.split(",") if n and n != "none")
    sample_names = tuple(n for n in args.sample.split(",") if n and n != "none")
    for names, known, flag in ((train_names, TRAIN, "--train"), (sample_names, SAMPLE, "--sample")):
        unknown = [n for n in names if n not in known]
        if unknown:  # checked before any run, not a KeyError after all the training
            parser.error(f"{flag}: unknown contender(s) {', '.join(unknown)}; known: {', '.join(known)} (or none)")
    if any(n.startswith("imagen-pytorch") for n in train_names + sample_names) and (
            importlib.util.find_spec("imagen_pytorch") is None):  # before any run, not after minutes of measuring
        parser.error("imagen-pytorch is not installed: pip install --no-deps imagen-pytorch==2.1.0 && pip install "
                     "beartype einops ema-pytorch kornia pytorch-warmup, or leave its contenders out of --train / "
                     "--sample")
    options = {k: v for k, v in vars(args).items() if k not in ("train", "sample", "out")}
    results = {"train": {n: [] for n in train_names}, "sample": {n: [] for n in sample_names}}
    started = time.time()
    for repeat in range(args.repeats):
        for task, names in (("train", train_names), ("sample", sample_names)):
            for name in names:
                result = measure(task, name, options)
                results[task][name].append(result)
                print(f"[repeat {repeat + 1}/{args.repeats}] {task} {name}: {result}", flush=True)
    lines = [f"# Our base stage against the peers (preset `{args.preset}`, batch {args.batch}, {args.threads} threads)",
             "", f"device: CPU ({cpu()['name']}; AMX bf16: {torch.cpu._is_amx_tile_supported()}), torch {torch.__version__}; "
             f"{args.repeats} alternating repeats, each contender in a fresh process; wall time "
             f"{time.time() - started:.0f} s", ""]
    if train_names:
        lines += table(results["train"], train_names, "ours", f"Training ({args.steps} timed steps after "
                                                              f"{args.warmup} warm-up, batch {args.batch})")
        lines += equal_precision(results["train"])
        full = _summary(results["train"].get("ours", []), "images_per_s")
        for name, what in (("ours-freeze", "the stem + first two down blocks"), ("ours-freeze3", "the stem + all "
                                                                                 "three down blocks")):
            frozen = _summary(results["train"].get(name, []), "images_per_s")
            if full and frozen:
                # paired: repeat r of both ran back to back, so their ratio cancels the machine's slow drifts
                pairs = [f["images_per_s"] / o["images_per_s"] for f, o in zip(results["train"][name],
                                                                               results["train"]["ours"])
                         if "images_per_s" in f and "images_per_s" in o]
                spread = ", ".join(f"{r:.2f}" for r in sorted(pairs))
                lines += ["", f"Fine-tuning with {what} frozen against full fine-tuning: **{frozen / full:.2f}x** "
                          f"(ratio of medians); per repeat {spread}, median {statistics.median(pairs):.2f}x"]
    if sample_names:
        lines += [""] + table(results["sample"], sample_names, "ours", f"Sampling (25 steps, guidance 3, "
                                                                      f"{args.sample_batch} images)")
    subsets = [f'--{task} "{",".join(names) or "none"}"' for task, names, every in (("train", train_names, TRAIN),
                                                                                   ("sample", sample_names, SAMPLE))
               if names != every]  # a run of some contenders only (none: that half skipped)
    flags = " ".join([*(f"--{k.replace('_', '-')} {v}" for k, v in options.items()), *subsets])
    lines += ["", f"Command: `python benchmarks/peers.py {flags}{' --out ' + args.out if args.out else ''}`"]
    publish("\n".join(lines) + "\n", args.out)
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(dict(options=options, results=results), indent=1))


if __name__ == "__main__":
    main()
