"""Issue #37: the source U-Net as a task backbone fine-tuned end to end (backbone.py, dense_probe's backbone rows)."""

import pytest
import torch
from test_dense import dense_sets  # noqa: F401 - the module fixture the end-to-end test reads

from imagen_transfer.backbone import (
    BACKBONE_LR_RATIO,
    UNetBackbone,
    make_backbone,
    optimizer_for,
    param_groups,
)
from imagen_transfer.errors import UserError
from imagen_transfer.text import TinyTextEncoder


@pytest.fixture(scope="module")
def sr_stage(tiny_cascade):
    return tiny_cascade.stage("sr")


def _text():
    return TinyTextEncoder(dim=32)([""])


def test_the_backbone_starts_from_the_cascades_weights_and_the_scratch_twin_only_differs_in_them(sr_stage):
    stage = sr_stage
    pretrained = make_backbone(stage, _text(), ["mid", "up0"], pretrained=True, seed=0)
    scratch = make_backbone(stage, _text(), ["mid", "up0"], pretrained=False, seed=0)
    theirs = stage.unet.state_dict()
    mine = pretrained.unet.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k].float()) for k in theirs)
    other = scratch.unet.state_dict()
    assert other.keys() == mine.keys() and all(other[k].shape == mine[k].shape for k in mine)
    assert scratch.unet.config == pretrained.unet.config and scratch.channels == pretrained.channels
    assert sum(not torch.equal(other[k], mine[k]) for k in mine) > len(mine) // 2  # fresh weights
    for a, b in zip(pretrained.parameters(), stage.unet.parameters()):  # a copy: training it leaves the cascade
        assert a is not b


def test_maps_are_standardised_by_the_training_images_and_the_recipe_splits_learning_rates(sr_stage):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    trunk = make_backbone(sr_stage, _text(), ["mid", "up0"], pretrained=True, seed=0, stride=4)
    trunk.calibrate(x)
    with torch.no_grad():
        maps = trunk(x)
    assert maps.shape == (6, trunk.channels, 4, 4)
    assert torch.allclose(maps.mean(dim=(0, 2, 3)), torch.zeros(trunk.channels), atol=1e-4)
    assert torch.allclose(maps.std(dim=(0, 2, 3)), torch.ones(trunk.channels), atol=1e-3)
    head = torch.nn.Conv2d(trunk.channels, 2, 1)
    model = torch.nn.Sequential(trunk, head)
    groups = param_groups(model, 1e-3)
    assert groups[0]["lr"] == pytest.approx(1e-3 * BACKBONE_LR_RATIO) and groups[1]["lr"] == 1e-3
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in head.parameters()}
    opt, sched = optimizer_for(1e-3, 20)(model)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] <= 1e-3 and lrs[-1] < 1e-4  # warm-up, then the cosine decay


def test_frozen_blocks_get_no_gradient(sr_stage):
    trunk = UNetBackbone(sr_stage, _text(), ["mid"], freeze=("stem", "down0"))
    trunk(torch.rand(2, 3, 16, 16)).sum().backward()
    assert trunk.unet.conv_in.weight.grad is None and all(p.grad is None for p in trunk.unet.down_blocks[0].parameters())
    assert trunk.unet.mid_block.resnets[0].conv1.weight.grad is not None


def _blind_trunk(stage, x, blocks, *, frozen: bool, **kw) -> UNetBackbone:
    """A trunk whose input convolution is zeroed (its maps do not depend on the image), calibrated on `x`, with its
    U-Net frozen or trainable."""
    torch.manual_seed(0)
    trunk = UNetBackbone(stage, _text(), blocks, **kw)
    with torch.no_grad():
        trunk.unet.conv_in.weight.zero_()
    trunk.calibrate(x)
    for p in trunk.unet.parameters():
        p.requires_grad_(not frozen and p.requires_grad)
    return trunk


def _halves(n=12, size=16):
    """Images whose left or right half is bright (the class), masks labelling the bright half 1, the rest 0."""
    gen = torch.Generator().manual_seed(0)
    images, masks = [], []
    for i in range(n):
        img = torch.full((3, size, size), -0.5) + 0.05 * torch.randn(3, size, size, generator=gen)
        mask = torch.zeros(size, size, dtype=torch.long)
        side = slice(0, size // 2) if i % 2 else slice(size // 2, size)
        img[:, :, side] = 0.8
        mask[:, side] = 1
        images.append(img)
        masks.append(mask)
    return torch.stack(images), torch.stack(masks)


@pytest.mark.slow
def test_a_fine_tuned_backbone_fits_what_its_frozen_self_cannot(sr_stage):
    """Constructed so the answer is known: the U-Net's input convolution is zeroed, so its frozen maps do not depend
    on the image at all and no head on them can tell the bright half from the dark one (mIoU at chance); fine-tuning
    the backbone end to end gives the input convolution gradients and the task is learnt."""
    from imagen_transfer.backbone import BackboneSegmenter
    from imagen_transfer.segmentation import ConvSegHead, segment, segmentation_scores, train_segmenter

    x, masks = _halves(n=8)
    scores = {}
    for name in ("frozen", "fine-tuned"):
        trunk = _blind_trunk(sr_stage, x, ["up1"], frozen=name == "frozen", stride=4)
        model = BackboneSegmenter(trunk, ConvSegHead(trunk.channels, 2, width=16))
        heads = train_segmenter("model", x, masks, 2, lr=3e-3, steps=25, seed=0, model=model,
                                optimizer=optimizer_for(3e-3, 25), batch_size=4)
        scores[name] = segmentation_scores(segment(heads, "conv", x, (16, 16)), masks, ["dark", "bright"])["miou"]
    assert scores["frozen"] < 0.5 < scores["fine-tuned"], scores


@pytest.mark.slow
def test_backbone_rows_in_the_dense_probe_and_its_command(dense_sets, tiny_cascade_dir, tmp_path, capsys):  # noqa: F811
    """The protocol runs the backbone rows like any other (lr on validation, label efficiency over seeds) and
    records their recipe; the command line passes them through."""
    import json

    from imagen_transfer.dense_probe import run_dense
    from imagen_transfer.jobs.cli import main

    folder = dense_sets["segmentation"]
    result = run_dense(folder, tmp_path / "p", task="segmentation", steps=3, seeds=2, labelled=(4, None),
                       only=["backbone", "backbone-scratch"],
                       backbone=dict(model=str(tiny_cascade_dir), steps=3, crop=(16, 16), lrs=(2e-3,)),
                       progress=False)
    assert set(result["sets"]) == {"backbone", "backbone-scratch"}
    for r in result["sets"].values():
        assert [g["lr"] for g in r["grid"]] == [2e-3]  # the backbone rows' own learning-rate grid
        assert 0 <= r["test"]["miou"] <= 1 and len(r["label_efficiency"]["4"]) == 2 and r["parameters"] > 1e5
    assert result["backbone"]["steps"] == 3 and result["backbone"]["lr_ratio"] == BACKBONE_LR_RATIO
    assert result["backbone"]["crop"] == [16, 16]  # trained on windows, scored on whole images
    assert result["backbone"]["blocks"] == json.loads((folder / "manifest.json").read_text())["blocks"]
    assert main(["probe", "--features", str(folder), "--task", "segmentation", "--steps", "2", "--seeds", "1",
                 "--labelled", "all", "--sets", "backbone", "--backbone", str(tiny_cascade_dir), "--backbone-steps",
                 "2", "--out", str(tmp_path / "cli")]) == 0
    assert "| backbone |" in capsys.readouterr().out
    assert main(["probe", "--features", str(folder), "--task", "classification", "--backbone", "x"]) == 2


def test_an_interrupted_dense_probe_resumes_to_the_uninterrupted_result(dense_sets, tiny_cascade_dir,  # noqa: F811
                                                                       tmp_path, monkeypatch):
    """Kill a probe after 3 fits: a fresh start there is refused (the journal would be lost); --resume fits only
    the missing ones and writes the uninterrupted run's result (every fit is seeded), the chosen backbone head
    restored from its saved weights; a resume with other settings is refused and names the difference."""
    import json

    from imagen_transfer.dense_probe import DenseTask, probe_dense, run_dense
    from imagen_transfer.jobs.cli import main

    folder = dense_sets["detection"]
    kw = dict(task="detection", steps=3, seeds=2, labelled=(4, None), only=["pixels", "backbone"], progress=False,
              backbone=dict(model=str(tiny_cascade_dir), steps=2, lrs=(1e-3, 2e-3)))
    whole = run_dense(folder, tmp_path / "whole", **kw)
    _, reference = probe_dense(folder, **{k: v for k, v in kw.items() if k != "task"})
    fit, calls, limit = DenseTask.fit, [], [3]

    def dying(self, *args, **kwargs):
        if kwargs.get("train", True):
            calls.append(args[0])
            if len(calls) > limit[0]:
                raise KeyboardInterrupt  # as a kill would stop it: no clean-up code of ours runs after
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(DenseTask, "fit", dying)
    with pytest.raises(KeyboardInterrupt):
        run_dense(folder, tmp_path / "cut", **kw)
    limit[0], cli = 0, tmp_path / "cli"  # the command line: killed at its first fit, then resumed there
    argv = ["probe", "--features", str(folder), "--task", "detection", "--steps", "1", "--seeds", "1", "--labelled",
            "all", "--sets", "pixels", "--out", str(cli)]
    assert main(argv) == 130 and (cli / "fits.jsonl").is_file()
    limit[0] = 100
    assert main(argv + ["--resume"]) == 0 and (cli / "probe-detection.json").is_file()
    calls.clear()
    limit[0] = 3
    journal = (tmp_path / "cut" / "fits.jsonl").read_text().splitlines()
    assert len(journal) == 1 + 3 and not (tmp_path / "cut" / "probe-detection.json").exists()
    with pytest.raises(UserError, match="3 finished fits of an interrupted probe: add --resume"):
        run_dense(folder, tmp_path / "cut", **kw)
    with pytest.raises(UserError, match="other settings.*steps: 3 -> 4"):
        run_dense(folder, tmp_path / "cut", **dict(kw, steps=4), resume=True)
    calls.clear()
    limit[0] = 100
    resumed = run_dense(folder, tmp_path / "cut", **kw, resume=True)
    per_set = 2 + 2 + 1  # the lr grid, 4 labels x 2 seeds, all labels' second seed
    assert len(calls) == 2 * per_set - 3 and resumed["fits_read_back"] == 3
    assert resumed["sets"] == whole["sets"]
    assert json.loads((tmp_path / "cut" / "fits.jsonl").read_text().splitlines()[-1]) == {"complete": True}
    calls.clear()  # the learning-rate grid may grow on resume: only the new candidate (and its rows if chosen) fit
    grown = run_dense(folder, tmp_path / "cut", **dict(kw, backbone=dict(kw["backbone"], lrs=(1e-3, 2e-3, 5e-4))),
                      resume=True)
    assert [g["lr"] for g in grown["sets"]["backbone"]["grid"]] == [1e-3, 2e-3, 5e-4]
    assert calls[0] == "backbone" and len(calls) in (1, 1 + 2 + 1) and grown["fits_read_back"] >= 2 * per_set - 3
    _, restored = probe_dense(folder, out=tmp_path / "cut", resume=True, **{k: v for k, v in kw.items() if k != "task"})
    head, again = reference["backbone"][0].state_dict(), restored["backbone"][0].state_dict()
    assert head.keys() == again.keys() and all(torch.equal(head[k], again[k]) for k in head)
    run_dense(folder, tmp_path / "cut", **dict(kw, only=["pixels"]))  # finished: a fresh probe may replace it
    assert len((tmp_path / "cut" / "fits.jsonl").read_text().splitlines()) == 1 + per_set + 1
    assert main(["probe", "--features", str(folder), "--task", "classification", "--resume"]) == 2


def test_a_training_window_cuts_images_and_centernet_targets_alike():
    """Known answer: the window's targets equal the targets of the boxes shifted into the window (those whose
    centre falls inside it), and its pixels are the images' pixels there."""
    from imagen_transfer.detection import centernet_targets, crop_window

    boxes = [torch.tensor([[4.0, 4.0, 12.0, 12.0], [36.0, 20.0, 44.0, 28.0]])]
    labels = [torch.tensor([0, 1])]
    full = centernet_targets(boxes, labels, 2, (8, 12), 4)  # a 32 x 48 image, stride 4
    x = torch.arange(32 * 48, dtype=torch.float).view(1, 1, 32, 48)
    gen = torch.Generator().manual_seed(3)
    xb, window = crop_window(x, full, (16, 24), 4, gen)
    gy, gx = int(xb[0, 0, 0, 0]) // 48 // 4, int(xb[0, 0, 0, 0]) % 48 // 4  # where the window starts (grid cells)
    assert torch.equal(xb, x[..., 4 * gy:4 * gy + 16, 4 * gx:4 * gx + 24])
    shift = torch.tensor([4.0 * gx, 4.0 * gy] * 2)
    inside = [i for i, b in enumerate(boxes[0]) if 4 * gx <= (b[0] + b[2]) / 2 < 4 * gx + 24
              and 4 * gy <= (b[1] + b[3]) / 2 < 4 * gy + 16]
    expected = centernet_targets([boxes[0][inside] - shift], [labels[0][inside]], 2, (4, 6), 4)
    assert torch.equal(window["mask"], expected["mask"]) and torch.allclose(window["size"], expected["size"])
    assert torch.allclose(window["offset"], expected["offset"])
    peaks = window["heat"].amax(dim=(0, 2, 3))  # every class whose centre is inside keeps its peak of 1
    assert all(peaks[int(labels[0][i])] == 1 for i in inside)


def test_the_trunk_stops_after_its_last_block_without_changing_what_it_reads(sr_stage):
    """Known answer: a trunk reading mid + up0 gives the same maps as one that also reads up1 (which runs the
    U-Net further); the blocks after its last one are neither run nor trained."""
    from imagen_transfer.backbone import last_block

    assert last_block(["up0", "mid", "down2"]) == "up0" and last_block(["down1", "down0"]) == "down1"
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    short = UNetBackbone(sr_stage, _text(), ["mid", "up0"], pool=True)
    longer = UNetBackbone(sr_stage, _text(), ["mid", "up0", "up1"], pool=True)
    with torch.no_grad():
        a, b = short.raw(x), longer.raw(x)
    assert a.shape == (3, short.channels, 1, 1) and torch.equal(a, b[:, : short.channels])
    short(x).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in short.unet.up_blocks[1].parameters())
    assert all(p.grad is None and not p.requires_grad for p in short.unet.conv_out.parameters())
    assert short.unet.up_blocks[0].resnets[0].conv1.weight.grad is not None


def _bright_centre(n=24, size=16, seed=0):
    """Images whose class is a bright (1) or dark (0) centre square, and their labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=gen) * 0.4 - 0.8
    y = torch.arange(n) % 2
    x[y == 1, :, size // 4: 3 * size // 4, size // 4: 3 * size // 4] += 1.2
    return x, y


def test_a_fine_tuned_classifier_learns_what_its_frozen_input_cannot_see(sr_stage):
    """Constructed so the answer is known: with the input convolution zeroed, the frozen trunk's pooled vector is
    the same for every image (test accuracy at chance); fine-tuned end to end, it learns the bright centre."""
    from imagen_transfer.backbone_probe import BackboneClassifier, class_probs, train_classifier

    x, y = _bright_centre()
    accuracy = {}
    for name in ("frozen", "fine-tuned"):
        trunk = _blind_trunk(sr_stage, x, ["mid"], frozen=name == "frozen", pool=True)
        net = train_classifier(BackboneClassifier(trunk, 2), x, y, lr=1e-2, steps=40, batch_size=8, seed=0)
        accuracy[name] = float((class_probs(net, x).argmax(1) == y).float().mean())
    assert accuracy["frozen"] == 0.5 and accuracy["fine-tuned"] >= 0.9, accuracy


def test_the_classification_backbone_probe_and_its_command(tmp_path, tiny_cascade_dir, capsys):
    """`probe --model M --data SPEC --backbone` reads a labelled data set (no feature folder), runs both rows by the
    probe protocol (lr on validation, 1% / 10% / all labels over seeds) and writes the JSON and table; misuse is one
    error line before any model is opened."""
    import json

    from conftest import make_npz

    from imagen_transfer.jobs.cli import main

    data = make_npz(tmp_path / "toy.npz", n_train=40, n_val=12)
    out = tmp_path / "probe"
    assert main(["probe", "--model", str(tiny_cascade_dir), "--data", str(data), "--backbone", "--backbone-steps", "2",
                 "--seeds", "2", "--labelled", "10%", "all", "--out", str(out)]) == 0
    assert "| backbone-scratch |" in capsys.readouterr().out
    result = json.loads((out / "probe-classification.json").read_text())
    assert set(result["sets"]) == {"backbone", "backbone-scratch"} and result["n"] == dict(train=40, val=12, test=12)
    for r in result["sets"].values():
        assert r["lr"] in result["lrs"] and len(r["grid"]) == len(result["lrs"])
        assert [p["n_labels"] for p in r["label_efficiency"]["0.1"]] == [4, 4]  # 10% of each class, 2 seeds
        assert [p["n_labels"] for p in r["label_efficiency"]["1.0"]] == [40, 40]
        assert 0 < r["parameters"] and 0 <= r["test"]["accuracy"] <= 1
    assert result["stage"] == "base" and result["blocks"] == ["mid", "up0"] and result["machine"]["cpu"]["name"]
    assert main(["probe", "--model", str(tiny_cascade_dir), "--data", str(data), "--backbone", "--backbone-steps", "2",
                 "--seeds", "2", "--labelled", "10%", "all", "--out", str(out), "--resume"]) == 0  # all read back
    resumed = json.loads((out / "probe-classification.json").read_text())
    assert resumed["fits_read_back"] == 2 * (2 + 2 + 1)  # per set: the lr grid, 10% x 2 seeds, all labels' seed 1
    assert all(resumed["sets"][k]["label_efficiency"] == r["label_efficiency"] for k, r in result["sets"].items())
    for argv in (["--data", str(data), "--out", str(out)],  # no --backbone
                 ["--data", str(data), "--backbone", "--out", str(out)],  # no model
                 ["--model", str(tiny_cascade_dir), "--data", str(data), "--backbone", "--labelled", "5",
                  "--out", str(out)],  # counts are for dense tasks
                 ["--model", str(tiny_cascade_dir), "--data", str(data), "--backbone", "--task", "segmentation",
                  "--out", str(out)],
                 ["--model", str(tiny_cascade_dir), "--data", str(tmp_path / "missing"), "--backbone",
                  "--out", str(out)]):
        assert main(["probe", *argv]) == 2
        assert capsys.readouterr().err.count("error:") == 1


def test_a_learned_conditioning_starts_at_the_empty_prompt_and_trains_at_the_heads_rate(sr_stage):
    """`learned`: the text states are a parameter, equal to the empty prompt's at step 0 (same maps as `empty`), in
    the head's learning-rate group, and moved by training; `empty`: a fixed buffer."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    fixed = UNetBackbone(sr_stage, _text(), ["mid"], pool=True)
    learned = UNetBackbone(sr_stage, _text(), ["mid"], pool=True, conditioning="learned")
    assert "states" not in dict(fixed.named_parameters()) and isinstance(learned.states, torch.nn.Parameter)
    with torch.no_grad():
        assert torch.equal(fixed.raw(x), learned.raw(x))
    model = torch.nn.Sequential(learned, torch.nn.Flatten(), torch.nn.Linear(learned.channels, 2))
    groups = param_groups(model, 1e-2)
    assert any(p is learned.states for p in groups[1]["params"])
    assert not any(p is learned.states for p in groups[0]["params"])
    before = learned.states.detach().clone()
    opt, _ = optimizer_for(1e-2, 5)(model)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 0, 1])).backward()
        opt.step()
    assert not torch.equal(before, learned.states)
    with pytest.raises(Exception, match="conditioning"):
        UNetBackbone(sr_stage, _text(), ["mid"], conditioning="prompt")


@pytest.mark.slow
def test_a_dense_backbone_probe_reads_the_data_set_and_extracts_the_frozen_row_itself(tmp_path, tiny_cascade_dir,
                                                                                       capsys):
    """`probe --model M --data SPEC --task segmentation --backbone`: no feature folder given; M's frozen maps are
    extracted into OUT/features (reused by a second run) and probed beside the backbone rows; a data set of the
    other task is one error line before any work."""
    import json

    from test_dense import make_masks, make_voc

    from imagen_transfer.jobs.cli import main

    seg = make_masks(tmp_path / "seg", n=16, size=32)
    out = tmp_path / "probe"
    argv = ["probe", "--model", str(tiny_cascade_dir), "--data", str(seg), "--task", "segmentation", "--head", "conv",
            "--backbone", "--backbone-steps", "2", "--steps", "2", "--seeds", "1", "--labelled", "all",
            "--out", str(out)]
    assert main(argv) == 0
    result = json.loads((out / "probe-segmentation.json").read_text())
    assert set(result["sets"]) == {"source", "backbone", "backbone-scratch"}
    assert (out / "features" / "manifest.json").is_file() and result["features"] == str(out / "features")
    stamp = (out / "features" / "manifest.json").stat().st_mtime_ns
    assert main(argv) == 0 and (out / "features" / "manifest.json").stat().st_mtime_ns == stamp  # reused
    capsys.readouterr()
    voc = make_voc(tmp_path / "voc", n=8, width=64, height=48, faults=False)
    assert main(["probe", "--model", str(tiny_cascade_dir), "--data", str(voc), "--task", "segmentation",
                 "--backbone", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "detection" in err and not (tmp_path / "other").exists()


def test_a_classification_backbone_holds_out_val_only_when_there_is_none(tmp_path):
    """No val split: a seeded 10% of each training class becomes val (recorded); a val split that exists but is
    broken is the user's error, never silently replaced."""
    import numpy as np

    from imagen_transfer.backbone_probe import load_splits
    from imagen_transfer.errors import UserError
    from imagen_transfer.sources import open_source

    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 255, (20, 8, 8)).astype(np.uint8) for s in ("train", "test")}
    arrays |= {f"{s}_labels": (np.arange(20) % 2)[:, None].astype(np.uint8) for s in ("train", "test")}
    np.savez(tmp_path / "noval.npz", **arrays)
    splits, names, held = load_splits(open_source(str(tmp_path / "noval.npz")), 8)
    assert held["n"] == 2 and len(splits["train"][1]) == 18 and len(splits["val"][1]) == 2
    np.savez(tmp_path / "badval.npz", **arrays, val_images=arrays["test_images"])  # val without its labels
    with pytest.raises(UserError, match="val_labels"):
        load_splits(open_source(str(tmp_path / "badval.npz")), 8)
