"""DeepFloyd IF interoperability: IF's diffusers folders as a source, and export to plain diffusers pipelines.

Import (`import_if`, `imagen-transfer import-if`, or any `--source` / `--model` that is an IF stage-I folder): the
U-Nets and schedulers load as they are. IF's U-Nets predict a learned variance (2C output channels); the model
boundary (`diffusion.denoise`) keeps the epsilon half, training uses it alone, and sampling uses a fixed-variance
schedule, as diffusers' IF fine-tuning notes advise. IF's T5 reads 77 tokens and its U-Net attends to all of them
with no attention mask (that is how `IFPipeline` calls it), so imported cascades record an unmasked 77-token T5
(`TextEncoderSpec.masked = False`). Stage II gets IF's noise-augmentation level 250 and stage I IF's thresholding
(percentile 0.95, maximum 1.5).

Export (`export_diffusers`, `imagen-transfer export`): `<out>/stage_I` loads with `IFPipeline.from_pretrained` and
`<out>/stage_II` with `IFSuperResolutionPipeline.from_pretrained`, without this package. Their DDPM scheduler is the
one our `ddpm` sampler builds, so for cascades that follow IF's text convention (imported ones) the reloaded pipeline
gives our images for the same seed. Cascades trained here with a masked encoder (MiniLM, 20 tokens) still load and
run, but IFPipeline always encodes 77 tokens without a mask, so their images differ from ours (noted in the card).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer, T5EncoderModel

from .cascade import (
    DEFAULT_SAMPLING,
    Cascade,
    Stage,
    check_weights_cover,
    init_cascade,
    load_cascade,
    quiet_diffusers,
    read_cascade_json,
    resolve_model,
    set_sampling_aug_level,
)
from .checkpoint import latest_checkpoint, read_jsonl, stage_dir, step_name
from .config import RunConfig, load_config
from .errors import UserError
from .outputs import check_output_dir, write_atomic
from .sampling import make_scheduler
from .text import TextEncoderSpec, load_text_encoder, minilm_path, text_dim
from .transfer import finish_transfer, prepare_transfer

STEP_REF = re.compile(r"step-0*(\d+)")  # RUN/step-N: a run's checkpoint of step N
IF_TEXT_LENGTH = 77
IF_SR_NOISE_LEVEL = 250


def is_pipeline_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() and not (folder / "cascade.json").is_file()


def open_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Any model a command accepts, as a Cascade: a cascade folder or shipped name (`cascade.load_cascade`), a
    training run's checkpoint `RUN/step-N` (`cascade_at`), `MODEL+LORA_DIR` (a diffusers LoRA export applied to
    MODEL, `apply_lora`), or a DeepFloyd IF stage-I diffusers folder (`import_if`, stage I only; `import-if` adds
    stage II). The one place that dispatches on what a folder holds."""
    path = Path(name_or_path)
    base, plus, adapters = str(name_or_path).rpartition("+")
    if plus and not path.exists() and list(Path(adapters).glob(f"*/{LORA_FILE}")):
        return apply_lora(open_model(base, dtype, device), adapters)
    step = STEP_REF.fullmatch(path.name)
    if step and not path.exists() and (path.parent / "config.yaml").is_file():
        cascade = cascade_at(path.parent, int(step.group(1)))
        for stage in cascade.stages:
            stage.unet.to(device=device, dtype=dtype)
        return cascade
    folder = resolve_model(name_or_path)
    if not is_pipeline_folder(folder):
        return load_cascade(folder, dtype=dtype, device=device)
    cascade = import_if(folder)
    for stage in cascade.stages:
        stage.unet.to(device=device, dtype=dtype)
    return cascade


def cascade_at(run_dir: Path, step: int) -> Cascade:
    """A training run's cascade as it was at `step`: its starting cascade (config.yaml's source or preset) with each
    trained stage's weights from its checkpoint of that step, EMA weights where EMA kept them (an adapter merged, as
    the run's final cascade holds it); stages the run did not train stay as they started. A step the run kept no
    checkpoint of is one error line listing those it kept (keep more with train.keep_steps)."""
    config = load_config(run_dir / "config.yaml")
    missing = {name: sorted(p.name for p in stage_dir(run_dir, name).glob("step-*") if (p / "state.json").is_file())
               for name in config.train.stages
               if not (stage_dir(run_dir, name) / step_name(step) / "state.json").is_file()}
    if missing:
        name, kept = next(iter(missing.items()))
        raise UserError(f"{run_dir} has no checkpoint step-{step} of stage {name} (kept: {', '.join(kept) or 'none'}); "
                        "keep one with train.keep_steps=[N] when training")
    cascade = build_or_load_cascade(config, resume=True)
    set_sampling_aug_level(cascade, config.sample.aug_level)
    final = run_dir / "cascade" / "cascade.json"
    if final.is_file():  # the run's own sampling settings (grayscale, augmentation level)
        cascade.sampling = {**cascade.sampling, **json.loads(final.read_text()).get("sampling", {})}
    for name in config.train.stages:
        stage, folder = cascade.stage(name), stage_dir(run_dir, name) / step_name(step)
        prepare_transfer(stage.unet, config.transfer)  # the run's parameter names (adapters included)
        params = dict(stage.unet.named_parameters())
        with torch.no_grad():
            for file in ("model.safetensors", "ema.safetensors"):  # the EMA of the trained weights last
                for key, tensor in load_file(folder / file).items():
                    if key not in params:
                        raise UserError(f"{folder / file}: weight {key} does not fit the run's model ({config.transfer.method})")
                    params[key].copy_(tensor)
        finish_transfer(stage.unet)
        stage.unet.float().eval()
    cascade.info = {**cascade.info, "run": str(run_dir), "step": step}
    return cascade


def _check_layout(folder: Path, what: str) -> None:
    missing = [p for p in ("unet/config.json", "scheduler/scheduler_config.json") if not (folder / p).is_file()]
    if not folder.is_dir() or missing:
        raise UserError(f"{folder} is not an IF-compatible diffusers folder ({what}): missing "
                        f"{', '.join(missing) if folder.is_dir() else 'the folder itself'} (expected unet/ with "
                        "config.json and weights, scheduler/ with scheduler_config.json)")


def import_if(stage1: str | Path, stage2: str | Path | None = None, text_encoder: str | Path | None = None):
    """A Cascade from IF stage I (and optionally stage II) diffusers folders; T5 from `text_encoder` or stage I."""

    stage1 = Path(stage1)
    _check_layout(stage1, "stage I")
    t5 = Path(text_encoder) if text_encoder else stage1
    if not ((t5 / "text_encoder").is_dir() or (t5 / "config.json").is_file()):
        raise UserError(f"no T5 text encoder in {t5}: pass --text-encoder with IF's text_encoder/ + tokenizer/ "
                        "folder (or a T5 encoder folder)")
    spec = TextEncoderSpec("t5", IF_TEXT_LENGTH, str(t5.resolve()), None, masked=False)
    stages = []
    for folder, kind in ((stage1, "base"), (Path(stage2) if stage2 else None, "sr")):
        if folder is None:
            continue
        _check_layout(folder, "stage II" if kind == "sr" else "stage I")
        with quiet_diffusers():
            unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
        check_weights_cover(unet, folder / "unet")
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
        expected = 2 * 3 if kind == "sr" else 3
        if unet.config.in_channels != expected:
            raise UserError(f"{folder}/unet takes {unet.config.in_channels} input channels; an IF stage "
                            f"{'II' if kind == 'sr' else 'I'} takes {expected}")
        stages.append(Stage("base" if kind == "base" else "sr", kind, unet.config.sample_size, unet, scheduler,
                            lowres=stages[0].resolution if kind == "sr" else None, aug_level_sample=IF_SR_NOISE_LEVEL))
    width = getattr(load_text_encoder(spec), "dim", None)
    hid = stages[0].unet.config.encoder_hid_dim or stages[0].unet.config.cross_attention_dim
    if width != hid:
        raise UserError(f"the text encoder in {t5} gives {width}-d states but {stage1}/unet expects {hid}")
    info = dict(imported_from=dict(stage_I=str(stage1), stage_II=str(stage2) if stage2 else None, format="DeepFloyd IF"))
    return Cascade(spec, stages, sampling=dict(DEFAULT_SAMPLING), info=info)


def sampling_scheduler_config(stage, sampling: dict) -> dict:
    """The DDPM scheduler config our `ddpm` sampler uses for this stage, for a diffusers pipeline to load."""
    scheduler = make_scheduler(stage.scheduler.config, "ddpm", sampling.get("thresholding", "dynamic"),
                               sampling.get("percentile", 0.95), sampling.get("max_value", 1.5))
    return dict(scheduler.config)


def _text_components(cascade):

    spec = cascade.text_encoder
    if spec.kind == "tiny":
        raise UserError("the tiny hash text encoder has no transformers equivalent: export needs a cascade with a "
                        "minilm or t5 text encoder")
    path = Path(minilm_path() if spec.kind == "minilm" else spec.name_or_path)
    pipeline = (path / "text_encoder").is_dir()
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer" if pipeline else path)
    loader = T5EncoderModel if spec.kind == "t5" else AutoModel
    return tokenizer, loader.from_pretrained(path / "text_encoder" if pipeline else path).eval()


def export_diffusers(cascade, out: str | Path) -> Path:
    """Write `<out>/stage_I` (IFPipeline) and, with an SR stage, `<out>/stage_II` (IFSuperResolutionPipeline)."""
    # here, not at the top: diffusers' IF pipelines import transformers' CLIP image processor, which prints a
    # torchvision warning on every command that merely loads a model
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    out = Path(out)
    check_output_dir(out, what="diffusers export")  # an existing non-empty folder is refused, never mixed into
    tokenizer, text_encoder = _text_components(cascade)
    written = []
    for stage in cascade.stages:
        scheduler = DDPMScheduler.from_config(sampling_scheduler_config(stage, cascade.sampling))
        common = dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=stage.unet, scheduler=scheduler,
                      safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
        if stage.kind == "base":
            pipe, folder = IFPipeline(**common), out / "stage_I"
        else:
            noising = DDPMScheduler.from_config(stage.scheduler.config)
            pipe, folder = IFSuperResolutionPipeline(image_noising_scheduler=noising, **common), out / "stage_II"
        pipe.save_pretrained(folder, safe_serialization=True)
        written.append((stage, folder))
    write_atomic(out / "README.md", _model_card(cascade, written))
    return out


LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for


def export_lora(run_dir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """A LoRA run's adapters as diffusers LoRA files: `<out>/stage_I/pytorch_lora_weights.safetensors` (and
    stage_II for an SR stage), in the layout `IFPipeline.load_lora_weights` reads (peft keys under `unet.`), the
    weights the run's cascade merged (its EMA; the best checkpoint's when early stopping restored it, else the
    latest; or `step`'s). Diffusers scales an adapter by alpha / rank with alpha = rank unless told otherwise, so
    the run's alpha / rank is folded into lora_B: loaded into the source's pipeline, it gives the run's model."""
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a training run folder (no config.yaml); export --lora takes a LoRA run")
    config = load_config(run_dir / "config.yaml")
    t = config.transfer
    if t.method != "lora":
        raise UserError(f"{run_dir} trained with transfer.method={t.method}, not lora: export its cascade with "
                        f"`export --model {run_dir}/cascade` instead")
    restored = {r.get("stage") for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "restore_best"} \
        if (run_dir / "metrics.jsonl").is_file() else set()
    files = {}
    for name in config.train.stages:
        if step is not None:
            folder = stage_dir(run_dir, name) / step_name(step)
        else:
            folder = latest_checkpoint(run_dir, name, "best" if name in restored else "latest")
        if folder is None or not (folder / "ema.safetensors").is_file():
            raise UserError(f"{run_dir}: no checkpoint of stage {name}{f' at step {step}' if step else ''} to export")
        ema = load_file(folder / "ema.safetensors")
        other = sorted(k for k in ema if ".lora_" not in k)
        if other:
            raise UserError(f"{run_dir} also trained {other[0]} (transfer.train_patterns): a LoRA file holds adapters "
                            f"only; export the merged cascade with `export --model {run_dir}/cascade`")
        scale = t.lora_alpha / t.lora_rank
        files[name] = {"unet." + k.replace(".default", ""): (v * scale if ".lora_B." in k else v).contiguous()
                       for k, v in ema.items()}
    final = run_dir / "cascade"
    kinds = ({s["name"]: s["kind"] for s in read_cascade_json(final)["stages"]} if (final / "cascade.json").is_file()
             else {s.name: s.kind for s in open_model(config.model.init_from).stages})
    check_output_dir(out, what="LoRA export")
    for name, tensors in files.items():
        folder = out / ("stage_I" if kinds[name] == "base" else "stage_II")
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, folder / LORA_FILE, metadata={"format": "pt", "source": str(config.model.init_from),
                                                        "rank": str(t.lora_rank), "run": str(run_dir)})
    return out


def apply_lora(cascade, folder: str | Path):
    """`cascade` with the diffusers LoRA files of `folder` (`stage_I/` for the base stage, `stage_II/` for the SR
    stage; peft keys `unet.<module>.lora_A.weight` / `lora_B.weight`, as `export --lora` and diffusers'
    save_lora_weights write them) merged into its U-Net weights: W += scale * B A, for linear and convolution
    layers alike, scale = lora_alpha / r from the file's `lora_adapter_metadata` when it has one, else 1."""
    folder = Path(folder)
    for stage in cascade.stages:
        file = folder / ("stage_I" if stage.kind == "base" else "stage_II") / LORA_FILE
        if not file.is_file():
            continue
        with safe_open(file, framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        scale = 1.0
        if "lora_adapter_metadata" in metadata:
            meta = json.loads(metadata["lora_adapter_metadata"])
            meta = meta.get("unet", meta)
            scale = float(meta.get("lora_alpha", meta.get("r", 1))) / float(meta.get("r", 1))
        modules = dict(stage.unet.named_modules())
        for key in (k for k in tensors if k.endswith(".lora_A.weight")):
            name = key[len("unet."):-len(".lora_A.weight")] if key.startswith("unet.") else None
            up = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if name not in modules or up is None:
                raise UserError(f"{file}: {key} names no layer of stage {stage.name} (or has no lora_B); a LoRA "
                                "file for this model is needed (diffusers / peft keys under unet.)")
            weight, down = modules[name].weight, tensors[key].float()
            delta = (up.float().flatten(1) @ down.flatten(1)).reshape(weight.shape)
            with torch.no_grad():
                weight += (scale * delta).to(weight.dtype)
        unknown = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
        if unknown:
            raise UserError(f"{file}: {unknown[0]} is not a LoRA weight this loader reads (lora_A / lora_B only)")
    cascade.info = {**cascade.info, "lora": str(folder)}
    return cascade


def _model_card(cascade, written) -> str:
    spec = cascade.text_encoder
    faithful = spec.kind == "t5" and not spec.masked and spec.max_length == IF_TEXT_LENGTH
    lines = ["# Exported from imagen-transfer", "",
             "Load with diffusers alone (no imagen-transfer needed):", "", "```python",
             "import torch", "from diffusers import IFPipeline, IFSuperResolutionPipeline",
             'stage_1 = IFPipeline.from_pretrained("stage_I")',
             'image = stage_1("chest x-ray, pneumonia", generator=torch.Generator().manual_seed(0), '
             'output_type="pt", clean_caption=False).images']
    if len(written) > 1:
        lines += ['stage_2 = IFSuperResolutionPipeline.from_pretrained("stage_II")',
                  f'image = stage_2(image=image * 2 - 1, prompt="chest x-ray, pneumonia", noise_level='
                  f'{written[1][0].aug_level_sample}, output_type="pt", clean_caption=False).images']
    lines += ["```", "", "| stage | resolution | parameters | prediction |", "|---|---|---|---|"]
    for stage, folder in written:
        params = sum(p.numel() for p in stage.unet.parameters()) / 1e6
        lines.append(f"| {folder.name} | {stage.resolution} px | {params:.2f}M | "
                     f"{stage.scheduler.config.prediction_type} |")
    lines += ["", f"Text encoder: {spec.kind} ({spec.name_or_path or 'all-MiniLM-L6-v2'}), trained with "
              f"{spec.max_length} tokens, {'no attention mask (IF convention)' if not spec.masked else 'an attention mask'}.",
              "Sampling: DDPM with Imagen's dynamic thresholding "
              f"(percentile {cascade.sampling.get('percentile')}, maximum {cascade.sampling.get('max_value')}).", ""]
    if cascade.sampling.get("grayscale"):
        lines.append("This model was fine-tuned on gray images: average the three output channels, as imagen-transfer "
                     "does when it samples.")
    if not faithful:
        lines.append("Note: IFPipeline always encodes 77 tokens and passes no attention mask to the U-Net, while this "
                     "model was trained with a masked encoder; images from the pipeline therefore differ from "
                     "imagen-transfer's own sampling for the same seed.")
    lines += ["", "Provenance: " + json.dumps(cascade.info), ""]
    return "\n".join(lines)


def build_or_load_cascade(config: RunConfig, resume: bool = False) -> Cascade:
    """A new cascade from `model.preset`, or the source cascade named by `model.init_from` (transfer: weights only).
    A resumed run is not held to the prediction-type rule: runs saved before it recorded `epsilon` while training
    the source's own target, and their checkpoints decide."""
    m = config.model
    if m.random_init and not m.init_from:
        raise UserError("model.random_init needs model.init_from: the cascade whose architecture is trained from scratch")
    if not m.init_from:
        return init_cascade(m.preset, text_encoder=m.text_encoder, max_text_length=m.max_text_length,
                            prediction_type=config.loss.prediction_type or "epsilon", seed=config.train.seed)
    cascade = open_model(m.init_from)
    wanted = config.loss.prediction_type
    for stage in cascade.stages:
        own = stage.scheduler.config.prediction_type
        if wanted and wanted != own and not m.random_init and not resume:
            raise UserError(f"loss.prediction_type={wanted}, but {m.init_from} stage {stage.name} was trained to predict "
                            f"{own}: transferred weights keep their target; leave loss.prediction_type unset, or set "
                            "model.random_init=true to train the architecture from scratch")
        if wanted and m.random_init:  # fresh weights may learn either target
            stage.scheduler = stage.scheduler.__class__.from_config(stage.scheduler.config, prediction_type=wanted)
    if m.text_encoder is not None:
        spec = TextEncoderSpec.parse(m.text_encoder, cascade.text_encoder.max_length)
        expected = cascade.stages[0].unet.config.encoder_hid_dim
        if text_dim(spec) != expected:
            raise UserError(f"text encoder '{m.text_encoder}' gives {text_dim(spec)}-d states, but the source cascade "
                            f"{m.init_from} was trained on {expected}-d states ({cascade.text_encoder.kind}); "
                            "leave model.text_encoder unset to use the source's encoder")
        cascade.text_encoder = spec
    if m.random_init:  # the same architecture, text encoder and noise schedule, fresh weights
        torch.manual_seed(config.train.seed)
        for stage in cascade.stages:
            stage.unet = UNet2DConditionModel.from_config(stage.unet.config).eval()
        cascade.info = {"random_init_from": str(m.init_from), "seed": config.train.seed}
    return cascade
