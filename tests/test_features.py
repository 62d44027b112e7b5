"""`features` and `probe`: hooks read the named blocks, noise is per image, sharding changes nothing, heads learn."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_npz

from imagen_transfer import openmp


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("data") / "toy.npz", n_train=96, n_val=32)


@pytest.fixture(scope="module")
def feature_dir(tiny_cascade_dir, toy, tmp_path_factory):
    from imagen_transfer.features import extract

    out = tmp_path_factory.mktemp("features") / "f"
    return extract({"tiny": str(tiny_cascade_dir)}, str(toy), out, timesteps=[10, 200], batch_size=16,
                   baselines=("pixels", "random", "text"), progress=False)


def test_feature_folder_layout(feature_dir, tiny_cascade):
    from imagen_transfer.features import block_names, load_features

    manifest, sets = load_features(feature_dir)
    unet = tiny_cascade.stage("base").unet
    assert set(sets) == {"tiny", "random", "pixels", "text"}
    assert manifest["splits"]["train"]["n"] == 96 and manifest["splits"]["test"]["labels"][:4] == [0, 1, 0, 1]
    views = manifest["sets"]["tiny"]["views"]
    assert views == [f"{b}@t{t}" for b in block_names(unet) for t in (10, 200)]
    assert manifest["sets"]["tiny"]["dims"]["mid@t10"] == [unet.config.block_out_channels[-1]]
    assert manifest["sets"]["pixels"]["dims"]["pixels"] == [3 * 16 * 16]
    assert sets["tiny"]["val/down0@t10"].shape == (32, unet.config.block_out_channels[0])
    assert not torch.allclose(sets["tiny"]["val/mid@t10"], sets["random"]["val/mid@t10"])


def test_hook_reads_the_named_block_and_noise_is_per_image(tiny_cascade, toy):
    from imagen_transfer.datasets import load_dataset
    from imagen_transfer.diffusion import add_noise, denoise
    from imagen_transfer.features import unet_features
    from imagen_transfer.sampling import randn
    from imagen_transfer.text import load_text_encoder

    stage = tiny_cascade.stage("base")
    images = load_dataset(str(toy), "val", resolution=16).images[:6]
    text = load_text_encoder(tiny_cascade.text_encoder)([""])
    one = unet_features(stage, images, blocks=["mid"], timesteps=[50], text=text, batch_size=6, progress=False)
    split = unet_features(stage, images[3:], blocks=["mid"], timesteps=[50], text=text, first_index=3, batch_size=2,
                          progress=False)
    assert torch.allclose(one["mid@t50"][3:], split["mid@t50"], atol=1e-5)  # batch- and shard-independent
    # by hand: the same noise, a hook on mid_block, global average pooling
    from imagen_transfer.data import to_float

    x0 = to_float(images)
    noise = randn(tuple(x0.shape), [torch.Generator().manual_seed(i) for i in range(6)])
    t = torch.full((6,), 50)
    seen = {}
    handle = stage.unet.mid_block.register_forward_hook(lambda m, i, o: seen.update(mid=o))
    with torch.no_grad():
        denoise(stage.unet, add_noise(x0, t, noise, stage.scheduler.alphas_cumprod), t, text.repeat(6))
    handle.remove()
    assert torch.allclose(one["mid@t50"], seen["mid"].mean(dim=(2, 3)), atol=1e-5)


def test_spatial_maps_sr_stage_and_bad_names(tiny_cascade, toy):
    from imagen_transfer.datasets import load_dataset
    from imagen_transfer.errors import UserError
    from imagen_transfer.features import unet_features
    from imagen_transfer.text import load_text_encoder

    text = load_text_encoder(tiny_cascade.text_encoder)([""])
    sr = tiny_cascade.stage("sr")
    images = load_dataset(str(toy), "val", resolution=32).images[:3]
    maps = unet_features(sr, images, blocks=["down0", "up0"], timesteps=[5], text=text, pool=False, progress=False)
    assert maps["down0@t5"].shape[0] == 3 and maps["down0@t5"].dim() == 4 and maps["up0@t5"].shape[-1] > 1
    with pytest.raises(UserError, match="unknown block 'down9'"):
        unet_features(sr, images, blocks=["down9"], timesteps=[5], text=text, progress=False)


def test_a_killed_extraction_resumes_from_its_cached_pieces(tiny_cascade_dir, toy, tmp_path, monkeypatch):
    """Features are computed in pieces cached on disk: a run killed part-way, rerun, computes only the pieces it had
    not finished, its features equal an uninterrupted run's bit for bit, and no piece is left behind."""
    from safetensors.torch import load_file

    import imagen_transfer.features as features

    monkeypatch.setattr(features, "PIECE_BATCHES", 2)  # pieces of 16 images: 6 per split of 96, 2 of 32
    settings = dict(splits=("train", "test"), timesteps=[10], batch_size=8, baselines=("random",), progress=False)
    models = {"tiny": str(tiny_cascade_dir)}
    whole = features.extract(models, str(toy), tmp_path / "whole", **settings)
    pieces_root = features.cache_root() / "unet-features"
    assert not list(pieces_root.rglob("*.safetensors"))  # dropped once the sets were written

    real, calls, kill_at = features.unet_features, [], [5]

    class Killed(Exception):
        pass

    def counted(*args, **kwargs):
        calls.append(kwargs["first_index"])
        if len(calls) in kill_at:
            raise Killed  # killed while computing the fifth piece
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "unet_features", counted)
    with pytest.raises(Killed):
        features.extract(models, str(toy), tmp_path / "resumed", **settings)
    assert len(list(pieces_root.rglob("*.safetensors"))) == 4 and not (tmp_path / "resumed").exists()
    calls.clear(), kill_at.clear()
    features.extract(models, str(toy), tmp_path / "resumed", **settings)
    assert len(calls) == 2 * (6 + 2) - 4 and calls[0] == 64  # only the missing pieces: train from image 64 on
    for name in ("tiny", "random"):
        one, two = load_file(whole / f"{name}.safetensors"), load_file(tmp_path / "resumed" / f"{name}.safetensors")
        assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)
    assert not list(pieces_root.rglob("*.safetensors"))


def test_probe_learns_toy_classes_and_writes_outputs(feature_dir):
    from imagen_transfer.probe import run_probe

    result = run_probe(feature_dir, epochs=10, fuse=[["tiny", "pixels"]], progress=False)
    views = sum(len(s["views"]) for s in json.loads((feature_dir / "manifest.json").read_text())["sets"].values())
    assert len(result["grid"]) == 3 * (views + 1)  # one head per (set, view, learning rate), and the fused set
    fused = result["best"]["tiny+pixels"]
    assert fused["view"] == f"{result['best']['tiny']['view']}+pixels" and fused["test"]["accuracy"] > 0.9
    assert result["best"]["pixels"]["test"]["accuracy"] > 0.9  # the toy classes differ by a bright centre
    assert result["best"]["text"]["test"]["accuracy"] == 1.0  # captions name the class
    assert set(result["label_efficiency"]["pixels"]) == {"0.01", "0.1", "1.0"}
    assert len(result["label_efficiency"]["pixels"]["0.1"]) == 3
    assert (feature_dir / "heatmap-tiny.png").is_file() and (feature_dir / "label_efficiency.png").is_file()
    assert "| pixels | pixels |" in (feature_dir / "probe-classification.md").read_text()
    assert json.loads((feature_dir / "probe-classification.json").read_text())["machine"]["cpu"] == openmp.cpu()
    retrieval = run_probe(feature_dir, task="retrieval", progress=False)["retrieval"]
    assert retrieval["pixels"]["test"]["recall@1"] > 0.9


def test_retrieval_scores_by_hand():
    from imagen_transfer.probe import retrieval_scores

    gallery = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    scores = retrieval_scores(torch.tensor([[1.0, 0.12]]), torch.tensor([1]), gallery, labels, ks=(1, 2))
    # ranking: item 1 (label 1), item 0 (label 0), item 2 (label 1): AP = (1/1 + 2/3) / 2
    assert scores["recall@1"] == 1.0 and scores["map"] == pytest.approx((1 + 2 / 3) / 2)


@pytest.mark.slow
def test_two_processes_extract_the_same_features(tiny_cascade_dir, toy, feature_dir, tmp_path):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", "-m", "imagen_transfer",
               "features", "--model", f"tiny={tiny_cascade_dir}", "--data", str(toy), "--timesteps", "10", "200",
               "--batch-size", "16", "--baselines", "none", "--out", str(tmp_path / "two")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two, one = load_file(tmp_path / "two" / "tiny.safetensors"), load_file(feature_dir / "tiny.safetensors")
    assert set(two) == set(one)
    assert all(torch.allclose(two[k], one[k], atol=1e-5) for k in one)


def test_without_a_val_split_the_probe_holds_out_part_of_train(tiny_cascade_dir, toy, tmp_path):
    """CIFAR-10 has train and test only: views and learning rates are then chosen on 10% of train per class, and
    test stays unseen (DDAE's in-domain protocol)."""
    from imagen_transfer.features import extract, load_features
    from imagen_transfer.probe import hold_out_val, run_probe

    folder = extract({"tiny": str(tiny_cascade_dir)}, str(toy), tmp_path / "f", splits=("train", "test"),
                     timesteps=[10], batch_size=16, baselines=("pixels",), progress=False)
    manifest, sets = load_features(folder)
    held, held_sets = hold_out_val(manifest, sets)
    train_labels = torch.tensor(manifest["splits"]["train"]["labels"])
    assert held["splits"]["val"]["n"] == sum(round(0.1 * int((train_labels == c).sum())) for c in (0, 1))
    assert held["splits"]["train"]["n"] + held["splits"]["val"]["n"] == 96
    rows = {tuple(r.tolist()) for r in sets["pixels"]["train/pixels"]}  # every image in exactly one of the two
    parts = [{tuple(r.tolist()) for r in held_sets["pixels"][f"{s}/pixels"]} for s in ("train", "val")]
    assert parts[0] | parts[1] == rows and not parts[0] & parts[1]
    assert torch.equal(held_sets["pixels"]["test/pixels"], sets["pixels"]["test/pixels"])
    result = run_probe(folder, epochs=5, progress=False)
    assert result["val_from_train"]["n"] == held["splits"]["val"]["n"] and result["best"]["pixels"]["test"]
    assert "held out" in (folder / "probe-classification.md").read_text()


def test_noise_draws_average_the_views_over_each_images_successive_noises(tiny_cascade, toy):
    """Known answer, by hand: with draws=2 a view is the mean of the view at the image's first noise (the
    single-draw features) and at its second (the next draw of the same per-image generator); batch-independent."""
    from imagen_transfer.data import to_float
    from imagen_transfer.datasets import load_dataset
    from imagen_transfer.diffusion import add_noise, denoise
    from imagen_transfer.features import unet_features
    from imagen_transfer.sampling import randn
    from imagen_transfer.text import load_text_encoder

    stage = tiny_cascade.stage("base")
    images = load_dataset(str(toy), "val", resolution=16).images[:4]
    text = load_text_encoder(tiny_cascade.text_encoder)([""])
    kw = dict(blocks=["mid"], timesteps=[200], text=text, progress=False)
    two = unet_features(stage, images, draws=2, batch_size=4, **kw)["mid@t200"]
    assert torch.allclose(two, unet_features(stage, images, draws=2, batch_size=3, **kw)["mid@t200"], atol=1e-5)
    x0, t = to_float(images), torch.full((4,), 200)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    by_hand = []
    for _ in range(2):
        noise = randn(tuple(x0.shape), gens)
        seen = []
        handle = stage.unet.mid_block.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o))
        with torch.no_grad():
            denoise(stage.unet, add_noise(x0, t, noise, stage.scheduler.alphas_cumprod), t, text.repeat(4))
        handle.remove()
        by_hand.append(seen[0].mean(dim=(2, 3)))
    one = unet_features(stage, images, batch_size=4, **kw)["mid@t200"]
    assert torch.allclose(one, by_hand[0], atol=1e-5) and not torch.allclose(by_hand[0], by_hand[1], atol=1e-3)
    assert torch.allclose(two, (by_hand[0] + by_hand[1]) / 2, atol=1e-5)


def test_concatenated_views_see_what_no_single_view_can():
    """Constructed so the answer is known: four classes, view `a` holds the class's high bit, view `b` its low bit,
    view `c` noise; no single view can beat 1/2, the best two concatenated read the class."""
    from imagen_transfer.probe import classify, top_views

    gen = torch.Generator().manual_seed(0)
    labels, tensors = {}, {}
    for split, n in (("train", 400), ("val", 200), ("test", 200)):
        y = torch.arange(n) % 4
        labels[split] = y.tolist()
        tensors[f"{split}/a@t10"] = (y // 2).float()[:, None].repeat(1, 4) + 0.1 * torch.randn(n, 4, generator=gen)
        tensors[f"{split}/b@t10"] = (y % 2).float()[:, None].repeat(1, 4) + 0.1 * torch.randn(n, 4, generator=gen)
        tensors[f"{split}/c@t10"] = 0.1 * torch.randn(n, 4, generator=gen)
    manifest = dict(label_names=list("wxyz"), sets=dict(s=dict(views=["a@t10", "b@t10", "c@t10"])),
                    splits={s: dict(n=len(v), labels=v) for s, v in labels.items()})
    plain = classify(manifest, dict(s=tensors), epochs=20, efficiency_seeds=1, fractions=(1.0,), progress=False)
    assert plain["best"]["s"]["test"]["accuracy"] <= 0.6
    both = classify(manifest, dict(s=tensors), epochs=20, efficiency_seeds=1, fractions=(1.0,), concat=2,
                    progress=False)
    assert top_views(both["grid"], "s", 2) in (["a@t10", "b@t10"], ["b@t10", "a@t10"])
    assert both["best"]["s"]["view"].count("+") == 1 and both["best"]["s"]["test"]["accuracy"] >= 0.95


def test_bf16_features_are_fp32_maps_near_fp32s_under_their_own_key(tiny_cascade_dir, toy, tmp_path):
    """precision=bf16: the U-Net under bf16 autocast, the maps stored as fp32, close to the fp32 ones (bf16 keeps 8
    significant bits: relative changes of about 1e-2 through a few layers), cached apart and recorded."""
    from imagen_transfer.features import extract, load_features

    kw = dict(splits=("val",), timesteps=[200], batch_size=16, baselines=(), progress=False)
    manifest_a, a = load_features(extract({"tiny": str(tiny_cascade_dir)}, str(toy), tmp_path / "a", **kw))
    manifest_b, b = load_features(extract({"tiny": str(tiny_cascade_dir)}, str(toy), tmp_path / "b",
                                          precision="bf16", **kw))
    assert (manifest_a["precision"], manifest_b["precision"]) == ("no", "bf16")
    for view, fp32 in a["tiny"].items():
        bf16 = b["tiny"][view]
        assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32), view
        assert ((bf16 - fp32).norm(dim=1) / fp32.norm(dim=1)).max() < 0.1, view
    from imagen_transfer.jobs.cli import main  # the command line passes it through

    assert main(["features", "--model", f"tiny={tiny_cascade_dir}", "--data", str(toy), "--splits", "val",
                 "--timesteps", "200", "--baselines", "none", "--precision", "bf16", "--batch-size", "16",
                 "--out", str(tmp_path / "c")]) == 0
    manifest_c, c = load_features(tmp_path / "c")
    assert manifest_c["precision"] == "bf16" and all(torch.equal(c["tiny"][v], b["tiny"][v]) for v in b["tiny"])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_a_probe_head_trains_the_same_alone_or_beside_others(kind):
    """Every head draws its initialisation and its dropout from its own stream (probe._head_stream), so the grid's
    joint pass equals training each head by itself: the mlp head's dropout would otherwise take the numbers the
    heads before it left, and a view's score would depend on which other views the folder holds."""
    from imagen_transfer.probe import train_heads

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (40,), generator=g)
    inputs = {name: torch.randn(40, 6, generator=g) + labels[:, None] for name in ("a@t10", "b@t100", "pixels")}
    together = train_heads(inputs, labels, 3, head=kind, epochs=3, batch_size=16, progress=False)
    alone = train_heads({"pixels": inputs["pixels"]}, labels, 3, head=kind, epochs=3, batch_size=16, progress=False)
    for lr in (1e-3, 1e-2):
        pairs = zip(together["pixels", lr].state_dict().values(), alone["pixels", lr].state_dict().values())
        assert all(torch.equal(x, y) for x, y in pairs)
    start = train_heads({"a@t10": inputs["a@t10"]}, labels, 3, head=kind, epochs=0, progress=False)
    weights = [next(iter(start["a@t10", lr].state_dict().values())) for lr in (1e-3, 1e-2)]
    assert not torch.equal(*weights)  # yet each head its own stream: no two start alike
