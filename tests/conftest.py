"""Shared fixtures: tiny cascades and small synthetic datasets, so every test runs in seconds on a CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("IMAGEN_TRANSFER_DATA", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two threads per test process; under pytest-xdist (`-n 2`, the README's fast loop) the workers share the cores,
# so each takes its share instead of oversubscribing them (OpenMP threads spinning against each other).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // WORKERS))
# The command line chooses threads from the load (openmp.auto_threads); tests keep this fixed count, so a result
# never depends on what else the machine ran (test_openmp.py turns the choosing on where it is the subject).
os.environ["IMAGEN_TRANSFER_THREADS"] = str(torch.get_num_threads())


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session writes its text/data caches under a temporary folder, never into the home folder."""
    monkeypatch.setenv("IMAGEN_TRANSFER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def tiny_cascade():
    from imagen_transfer.cascade import init_cascade

    return init_cascade("tiny", seed=0)


@pytest.fixture(scope="session")
def small_feature_net(tmp_path_factory):
    """A tiny TorchScript 'Inception' (16-d features) standing in for TF-Inception, so a measurement takes seconds."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 7, stride=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    path = tmp_path_factory.mktemp("nets") / "features.pt"
    torch.jit.save(torch.jit.script(net.eval()), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_cascade_dir(tmp_path_factory, tiny_cascade):
    from imagen_transfer.cascade import save_cascade

    return save_cascade(tiny_cascade, tmp_path_factory.mktemp("models") / "tiny")


def make_npz(path: Path, n_train: int = 48, n_val: int = 16, size: int = 28, seed: int = 0) -> Path:
    """A MedMNIST-layout file whose two classes differ visibly (dark vs bright centre)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_val)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 60, size=(n, size, size)).astype(np.uint8)
        images[labels == 1, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] += 150
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path


def make_image_folder(root: Path, n: int = 6, size: int = 20, metadata: bool = True) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = ["red", "blue"][i % 2]
        rel = f"{label}/img{i}.png"
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size + 4, 3)).astype(np.uint8)).save(root / rel)
        rows.append({"file_name": rel, "text": f"a {label} square number {i}", "label": label})
    if metadata:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


@pytest.fixture
def npz_dataset(tmp_path):
    return make_npz(tmp_path / "toy.npz")
