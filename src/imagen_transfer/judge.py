"""Conditioning accuracy: a small classifier trained on a dataset's real training split judges whether a generated
image shows the class its caption asked for.

The judge is a four-block CNN trained for a few epochs at the model's output resolution. It is cached (safetensors +
JSON, keyed by dataset, split, resolution and seed), and its accuracy on the real evaluation split is reported next to
the conditioning accuracy: a judge that is 85% right on real images bounds what it can certify on generated ones.

The judges of the data the demo and the shipped cascade are measured on ship with the package (models/judges/, made
by scripts/ship_judge.py, each with its card), under the same key: the key holds the data file's content hash, so a
shipped judge is used only for the very file it was trained on, and any other data trains its own on first use. A
judge is an instrument of the protocol, like the TF-Inception weights: shipping it spares every first evaluation its
training (about 30 s of a 2-core CPU) without changing what it measures.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .data import ImageTextData, cache_root, to_float
from .datasets import load_dataset
from .openmp import adapt as adapt_threads
from .sources import DataSource, open_source

JUDGE_VERSION = 1
SHIPPED = Path(__file__).parent / "models" / "judges"  # <key hash>/judge.safetensors + judge.json + README.md


def build_judge(num_classes: int, width: int = 32) -> nn.Sequential:
    """conv-GroupNorm-ReLU blocks with stride-2 downsampling, global average pooling, a linear head (GroupNorm, not
    BatchNorm: no running statistics, so a judge trained for few steps behaves the same in eval mode)."""
    layers, channels = [], 3
    for i, out in enumerate([width, width * 2, width * 4, width * 4]):
        layers += [nn.Conv2d(channels, out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                   nn.GroupNorm(8, out), nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


def _inputs(images_uint8: torch.Tensor) -> torch.Tensor:
    x = to_float(images_uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.inference_mode()
def predict(judge: nn.Module, images_uint8: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities (N, K) for uint8 images (N, H, W, C)."""
    judge.eval()
    return torch.cat([judge(_inputs(images_uint8[i : i + batch_size])).softmax(-1)
                      for i in range(0, len(images_uint8), batch_size)])


def train_judge(data: ImageTextData, epochs: int = 8, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                progress: bool = True) -> nn.Sequential:
    """Train on labelled real images with random flips and 2-pixel shifts; AdamW with a one-cycle schedule."""
    labelled = data.labels >= 0
    images, labels = data.images[labelled], data.labels[labelled]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = build_judge(len(data.label_names))
    batch_size = min(batch_size, len(images))
    steps_per_epoch = max(1, len(images) // batch_size)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    judge.train()
    bar = tqdm(total=epochs * steps_per_epoch, desc="judge", disable=not progress, unit="step")
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        for b in range(steps_per_epoch):
            adapt_threads()
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = _inputs(images[idx])
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = nn.functional.cross_entropy(judge(x), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return judge.eval()


def load_or_train_judge(dataset: str | DataSource, resolution: int, *, split: str = "train", eval_split: str = "test",
                        seed: int = 0, epochs: int = 8, progress: bool = True) -> tuple[nn.Sequential, dict]:
    """The cached judge for (dataset, split, resolution, seed), trained on first use; with its facts (class names,
    accuracy on the real `eval_split`)."""
    dataset = open_source(dataset)
    path = dataset.path
    name = judge_key(dataset, resolution, split=split, eval_split=eval_split, seed=seed, epochs=epochs)
    folder = cache_root() / "judges" / name
    for found in (SHIPPED / name, folder):
        if (found / "judge.json").is_file():
            info = json.loads((found / "judge.json").read_text())
            judge = build_judge(len(info["classes"]))
            judge.load_state_dict(load_file(found / "judge.safetensors"))
            return judge.eval(), dict(info, shipped=found.parent == SHIPPED)
    train = load_dataset(dataset, split, resolution=resolution, channels=3)
    if (train.labels >= 0).sum() == 0 or len(train.label_names) < 2:
        raise ValueError(f"{path}: split '{split}' has no class labels (needs at least two classes)")
    judge = train_judge(train, epochs=epochs, seed=seed, progress=progress)
    real = load_dataset(dataset, eval_split, resolution=resolution, channels=3)
    accuracy = float((predict(judge, real.images).argmax(-1) == real.labels).float().mean())
    info = dict(classes=train.label_names, trained_on=f"{path.name}:{split} ({len(train)} images)", epochs=epochs,
                resolution=resolution, seed=seed, real_accuracy=accuracy, real_split=eval_split)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, tmp / "judge.safetensors")
    (tmp / "judge.json").write_text(json.dumps(info, indent=2))
    if not folder.exists():
        os.replace(tmp, folder)
    else:  # another process cached the same judge meanwhile: ours is the same, its temporary folder goes
        shutil.rmtree(tmp)
    return judge, dict(info, shipped=False)


def judge_key(dataset: DataSource, resolution: int, *, split: str = "train", eval_split: str = "test",
              seed: int = 0, epochs: int = 8) -> str:
    """The judge's folder name: a hash of what it depends on, the data file's content included."""
    key = f"{dataset.fingerprint}|{split}|{eval_split}|{resolution}|{seed}|{epochs}|v{JUDGE_VERSION}"
    return hashlib.sha1(key.encode()).hexdigest()[:24]


def conditioning_accuracy(judge: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor,
                          class_names: list[str]) -> dict:
    """Share of generated images the judge assigns to the class they were asked for, overall and per class."""
    pred = predict(judge, images_uint8).argmax(-1)
    hit = (pred == labels).float()
    per_class = {name: float(hit[labels == i].mean()) for i, name in enumerate(class_names) if (labels == i).any()}
    return dict(conditioning_accuracy=float(hit.mean()), conditioning_accuracy_per_class=per_class)
