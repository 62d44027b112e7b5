"""`imagen-transfer <command>`: each command parses its arguments, then calls one library function.

Heavy imports (torch, diffusers) happen inside the command handlers, so `imagen-transfer --help` stays fast.
Bad input raises `UserError`, printed as one line (`error: ...`) with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import UserError


def cmd_init(args) -> None:
    from .cascade import describe, init_cascade, save_cascade

    cascade = init_cascade(args.preset, text_encoder=args.text_encoder, max_text_length=args.max_text_length,
                           seed=args.seed)
    save_cascade(cascade, args.out)
    print(f"wrote {args.out}\n{describe(cascade)}")


def cmd_sample(args) -> None:
    from .cascade import load_cascade
    from .sampling import sample_cascade, save_grid

    if args.guidance is not None and args.guidance < 0:
        raise UserError(f"--guidance must be >= 0 (got {args.guidance}); 0 is unconditional, 1 conditional")
    if args.n < 1:
        raise UserError(f"--n must be >= 1 (got {args.n})")
    cascade = load_cascade(args.model)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(prompts))]
    images = sample_cascade(cascade, prompts, seeds, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                            thresholding=args.thresholding, stages=args.stages)
    save_grid(images, args.out, nrow=args.n, scale=args.scale)
    print(f"wrote {args.out}: {len(prompts)} images at {images.shape[-1]}px (seeds {seeds[0]}..{seeds[-1]})")


def cmd_info(args) -> None:
    from .cascade import describe, load_cascade

    print(describe(load_cascade(args.model)))


def cmd_pretrain(args) -> None:
    from .config import load_config
    from .train import train

    config = load_config(args.config, args.set)
    config.out = args.out or config.out or f"runs/{Path(args.config).stem if args.config else 'pretrain'}"
    print(f"run folder: {train(config, resume=args.resume)}")


def cmd_finetune(args) -> None:
    from .config import load_config
    from .train import train

    config = load_config(args.config, [f"model.init_from={args.source}", f"data.dataset={args.data}",
                                       f"transfer.method={args.method}", *args.set])
    config.out = args.out or config.out or f"runs/finetune-{Path(str(args.data)).stem}-{args.method}"
    print(f"run folder: {train(config, resume=args.resume)}")


def _add_run_arguments(p: argparse.ArgumentParser, out_default: str) -> None:
    """The arguments every training command shares: config file, overrides, run folder, resume."""
    p.add_argument("--config", default=None, help="a YAML file (see configs/)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. train.steps=100")
    p.add_argument("--out", default=None, help=f"run folder (default: {out_default})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagen-transfer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a randomly initialised cascade folder")
    p.add_argument("--preset", default="tiny", help="tiny | small | base64")
    p.add_argument("--text-encoder", default=None, help="tiny | minilm | t5:<path> (default: the preset's)")
    p.add_argument("--max-text-length", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("sample", help="sample a grid of images from a cascade")
    p.add_argument("--model", required=True, help="a cascade folder or a shipped name (e.g. cifar10)")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts (one row each)")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default=None)
    p.add_argument("--thresholding", choices=["off", "static", "dynamic"], default=None)
    p.add_argument("--stages", nargs="+", default=None, help="only these stages (e.g. base)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--scale", type=int, default=4, help="enlarge the grid by this factor")
    p.add_argument("--out", default="grid.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("info", help="describe a cascade folder")
    p.add_argument("model")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("pretrain", help="train a cascade (stage by stage) from a YAML config")
    _add_run_arguments(p, out_default="runs/<config name>")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="transfer a cascade to a new dataset (full, freeze, bitfit, difffit, lora)")
    p.add_argument("--source", required=True, help="a cascade folder or a shipped name (e.g. cifar10)")
    p.add_argument("--data", required=True, help="a dataset path or short name (e.g. pneumoniamnist)")
    p.add_argument("--method", required=True, choices=["full", "freeze", "bitfit", "difffit", "lora"])
    _add_run_arguments(p, out_default="runs/finetune-<data>-<method>")
    p.set_defaults(func=cmd_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
