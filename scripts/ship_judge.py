"""Ship a conditioning judge with the package (judge.py, models/judges/): train it exactly as a first evaluation
would (judge.load_or_train_judge, in an empty cache), then copy its folder and write its card.

    python scripts/ship_judge.py --data pneumoniamnist --resolution 32
    python scripts/ship_judge.py --data cifar10 --resolution 32

The folder's name is the judge's key (the data file's content hash, splits, resolution, seed, epochs), so the
package uses it only for that very file; evaluate records `judge.shipped` beside its real-image accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch

from imagen_transfer.errors import UserError
from imagen_transfer.judge import JUDGE_VERSION, SHIPPED, judge_key, load_or_train_judge
from imagen_transfer.openmp import cpu
from imagen_transfer.sources import open_source


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a data set file or shipped name (a folder has no content hash)")
    p.add_argument("--resolution", type=int, required=True, help="the resolution evaluations judge at")
    p.add_argument("--split", default="train")
    p.add_argument("--eval-split", default="test")
    p.add_argument("--into", default=str(SHIPPED), help="where the judges' folders go (default: the package's)")
    args = p.parse_args(argv)
    source = open_source(args.data)
    if source.path.is_dir():
        raise UserError(f"{source.path} is a folder: its judges are keyed by path, not content; ship from a file")
    name = judge_key(source, args.resolution, split=args.split, eval_split=args.eval_split)
    target = os.path.join(args.into, name)
    if os.path.exists(target):
        raise UserError(f"{target} exists: a judge for this data and setting is shipped already")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["IMAGEN_TRANSFER_CACHE"] = cache
        start = time.perf_counter()
        _, info = load_or_train_judge(source, args.resolution, split=args.split, eval_split=args.eval_split)
        wall = time.perf_counter() - start
        shutil.copytree(os.path.join(cache, "judges", name), target)
    info = {k: v for k, v in info.items() if k != "shipped"}
    command = "python scripts/ship_judge.py " + " ".join(sys.argv[1:] if argv is None else argv)
    card = [f"# Conditioning judge: {source.path.name} at {args.resolution} px", "",
            f"Trained by `{command}` (judge.py v{JUDGE_VERSION}: {info['epochs']} epochs, seed {info['seed']}) on "
            f"{info['trained_on']}.", "",
            f"- data file: `{source.path.name}`, content key `{source.fingerprint}`",
            f"- accuracy on the real `{info['real_split']}` split: **{info['real_accuracy']:.4f}**",
            f"- wall time {wall:.0f} s (training and its real-split accuracy) on {cpu()['name']}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}",
            "", "judge.json holds the same facts; evaluate reports them beside the conditioning accuracy."]
    with open(os.path.join(target, "README.md"), "w") as f:
        f.write("\n".join(card) + "\n")
    print(json.dumps(dict(folder=target, **info), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
