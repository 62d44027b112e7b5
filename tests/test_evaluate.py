"""`evaluate`: the protocol end to end on a tiny cascade, the reference cache, the judge, the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_npz


@pytest.fixture(scope="module")
def toy_npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("data") / "toy.npz", n_train=64, n_val=24)


@pytest.mark.slow
def test_evaluate_writes_eval_json_with_protocol_and_metrics(tiny_cascade_dir, toy_npz, small_feature_net, tmp_path):
    from imagen_transfer.evaluate import evaluate

    out = tmp_path / "eval.json"
    result = evaluate(str(tiny_cascade_dir), str(toy_npz), split="test", n=12, seed=1, batch_size=6,
                      sampling=dict(steps=2), feature_net=str(small_feature_net), out=out, progress=False)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["n_generated"] == 12 and saved["n_real"] == 24 and saved["split"] == "test"
    assert saved["resolution"] == 32 and saved["sampling"]["steps"] == 2
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "conditioning_accuracy"):
        assert isinstance(saved[key], float), key
    assert saved["kid_subset_size"] == 12
    assert saved["inception_score"] is None and "no logits" in saved["inception_score_absent"]
    assert 0 <= saved["judge"]["real_accuracy"] <= 1
    assert (tmp_path / saved["samples_grid"]).is_file()
    # the same seed gives the same numbers; the real features come from the cache the second time
    again = evaluate(str(tiny_cascade_dir), str(toy_npz), split="test", n=12, seed=1, batch_size=12,
                     sampling=dict(steps=2), feature_net=str(small_feature_net), progress=False)
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-4)
    assert again["conditioning_accuracy"] == result["conditioning_accuracy"]


def test_evaluate_with_logits_network_reports_inception_score(tiny_cascade_dir, toy_npz, small_feature_net,
                                                              tmp_path):
    """The IS reported is the one of the generated images under the logits network (metrics.inception_score has
    its known-answer tests in test_metrics); with n = 20 and 10 splits each split holds 2 images, so it is not the
    trivial 1.0 of one-image splits."""
    from safetensors.torch import load_file

    from imagen_transfer.evaluate import evaluate
    from imagen_transfer.metrics import extract_features, inception_score, load_feature_net

    result = evaluate(str(tiny_cascade_dir), str(toy_npz), n=20, sampling=dict(steps=1), judge=False,
                      feature_net=str(small_feature_net), logits_net=str(small_feature_net), progress=False,
                      out=tmp_path / "e.json")
    images = load_file(tmp_path / "e-generated.safetensors")["images"]
    logits = extract_features(load_feature_net(str(small_feature_net))[0], images, progress=False)
    assert result["inception_score"] == pytest.approx(inception_score(logits, seed=0)[0], rel=1e-9)
    assert result["inception_score"] > 1.0 and "inception_score_absent" not in result
    assert "conditioning_accuracy" not in result


def test_evaluate_a_prefix_of_the_cascade_against_a_real_subset(tiny_cascade_dir, toy_npz, small_feature_net):
    from imagen_transfer.errors import UserError
    from imagen_transfer.evaluate import evaluate

    result = evaluate(str(tiny_cascade_dir), str(toy_npz), n=6, n_real=10, judge=False, progress=False,
                      sampling=dict(steps=1, stages=["base"], precision="bf16"), feature_net=str(small_feature_net))
    assert result["resolution"] == 16 and result["n_real"] == 10  # the base stage's images, against 10 real ones
    assert result["sampling"]["stages"] == ["base"] and result["sampling"]["precision"] == "bf16"
    with pytest.raises(UserError, match="no stage named"):
        evaluate(str(tiny_cascade_dir), str(toy_npz), n=6, sampling=dict(stages=["hd"]), judge=False,
                 feature_net=str(small_feature_net), progress=False)


def test_judge_learns_the_classes_and_scores_conditioning(toy_npz):
    from imagen_transfer.datasets import load_dataset
    from imagen_transfer.judge import conditioning_accuracy, load_or_train_judge

    judge, info = load_or_train_judge(str(toy_npz), 32, epochs=15, progress=False)
    assert info["classes"] == ["0", "1"] and info["real_accuracy"] > 0.9
    real = load_dataset(str(toy_npz), "test", resolution=32, channels=3)
    right = conditioning_accuracy(judge, real.images, real.labels, info["classes"])
    wrong = conditioning_accuracy(judge, real.images, 1 - real.labels, info["classes"])
    assert right["conditioning_accuracy"] == pytest.approx(info["real_accuracy"])
    assert wrong["conditioning_accuracy"] == pytest.approx(1 - info["real_accuracy"])
    assert set(right["conditioning_accuracy_per_class"]) == {"0", "1"}
    cached, _ = load_or_train_judge(str(toy_npz), 32, epochs=15, progress=False)  # read back, not retrained
    assert all(torch.equal(a, b) for a, b in zip(judge.state_dict().values(), cached.state_dict().values()))


def test_evaluate_cli_rejects_bad_n(tiny_cascade_dir, toy_npz, capsys):
    from imagen_transfer.jobs.cli import main

    assert main(["evaluate", "--model", str(tiny_cascade_dir), "--data", str(toy_npz), "--n", "1"]) == 2
    assert "argument --n: must be >= 2 (got 1)" in capsys.readouterr().err


def test_bicubic_baseline_and_base_stage_reuse_the_cascades_own_base_samples(tiny_cascade_dir, toy_npz,
                                                                            small_feature_net, monkeypatch):
    """The bar is the same base images (same captions and seeds) upsampled bicubically, and `base_stage` those images
    at 16 px: both checked against samples rebuilt by hand; the base stage is sampled once for all three generators
    (recorded on the way through the cascade); both are absent (with the reason) when no SR stage is evaluated."""
    import imagen_transfer.evaluate as ev
    import imagen_transfer.measure as measure
    import imagen_transfer.sampling as sampling
    from imagen_transfer.cascade import load_cascade
    from imagen_transfer.metrics import extract_features, load_feature_net
    from imagen_transfer.sampling import sample_cascade, to_uint8

    calls = []
    real_sample_stage = sampling.sample_stage
    monkeypatch.setattr(sampling, "sample_stage",
                        lambda stage, *a, **k: calls.append(stage.name) or real_sample_stage(stage, *a, **k))
    result = ev.evaluate(str(tiny_cascade_dir), str(toy_npz), split="test", n=6, seed=2, batch_size=3,
                         sampling=dict(steps=2), feature_net=str(small_feature_net), judge=False,
                         bicubic_baseline=True, base_stage=True, progress=False)
    assert calls == ["base", "sr"] * 2  # two batches of 3, each stage once: the baselines drew nothing again
    monkeypatch.setattr(sampling, "sample_stage", real_sample_stage)
    baseline, alone = result["bicubic_baseline"], result["base_stage"]
    assert baseline["generator"] == "stage base + bicubic upsampling to 32px"
    assert alone["generator"] == "stage base alone at 16px" and alone["resolution"] == 16
    prompts, _ = measure.draw_captions(ev.load_dataset(str(toy_npz), "test", resolution=32), 6, seed=2)
    base = sample_cascade(load_cascade(tiny_cascade_dir), prompts, [2_000_000 + i for i in range(6)], steps=2,
                          stages=["base"], progress=False)
    net, net_id = load_feature_net(str(small_feature_net))
    for images, size, measured in ((torch.nn.functional.interpolate(base, size=(32, 32), mode="bicubic"), 32, baseline),
                                   (base, 16, alone)):
        real, _ = measure.reference_features(str(toy_npz), "test", size, net, net_id, progress=False)
        by_hand = extract_features(net, to_uint8(images.clamp(-1, 1)), progress=False)
        assert measured["kid_mean"] == pytest.approx(measure.kid(real, by_hand, seed=2)[0], abs=1e-6)
        assert measured["kid_mean"] != pytest.approx(result["kid_mean"], abs=1e-9)  # a different generator
    base_only = ev.evaluate(str(tiny_cascade_dir), str(toy_npz), split="test", n=4, judge=False, progress=False,
                            sampling=dict(steps=1, stages=["base"]), feature_net=str(small_feature_net),
                            bicubic_baseline=True, base_stage=True)
    assert base_only["bicubic_baseline"] is None and "SR stage" in base_only["bicubic_baseline_absent"]
    assert base_only["base_stage"] is None and "SR stage" in base_only["base_stage_absent"]


def test_a_rerun_reuses_the_generated_images_and_only_its_own(tiny_cascade_dir, toy_npz, small_feature_net,
                                                            tmp_path, monkeypatch):
    """The images (and base samples) are saved beside the JSON before any measuring; a rerun with the same protocol
    measures the same images without sampling (same numbers), one with another seed or changed model files samples
    again; a file with a foreign key is never reused."""
    import shutil

    import imagen_transfer.evaluate as ev
    import imagen_transfer.sampling as sampling
    from imagen_transfer.errors import UserError

    model = tmp_path / "model"
    shutil.copytree(tiny_cascade_dir, model)
    calls = []
    real_sample_stage = sampling.sample_stage
    monkeypatch.setattr(sampling, "sample_stage",
                        lambda stage, *a, **k: calls.append(stage.name) or real_sample_stage(stage, *a, **k))
    kw = dict(split="test", n=4, batch_size=4, sampling=dict(steps=1), feature_net=str(small_feature_net), judge=False,
              bicubic_baseline=True, base_stage=True, progress=False)
    first = ev.evaluate(str(model), str(toy_npz), out=tmp_path / "e.json", **kw)
    assert calls == ["base", "sr"] and (tmp_path / "e-generated.safetensors").is_file()
    again = ev.evaluate(str(model), str(toy_npz), out=tmp_path / "e.json", **kw)
    assert calls == ["base", "sr"] and again["generated_images"] == dict(file="e-generated.safetensors", reused=4)
    for k in ("kid_mean", "fid"):
        assert again[k] == first[k] and again["bicubic_baseline"][k] == first["bicubic_baseline"][k]
        assert again["base_stage"][k] == first["base_stage"][k]
    ev.evaluate(str(model), str(toy_npz), out=tmp_path / "e.json", **dict(kw, seed=1))  # another protocol
    assert calls == ["base", "sr"] * 2
    weights = next((model / "sr").rglob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the model changed
    assert ev.evaluate(str(model), str(toy_npz), out=tmp_path / "e.json", **dict(kw, seed=1))["generated_images"][
        "reused"] == 0 and calls == ["base", "sr"] * 3
    (tmp_path / "mine-generated.safetensors").write_bytes(b"a user's file")  # not ours: refused, left as it was
    with pytest.raises(UserError, match="mine-generated.safetensors exists and was not written by"):
        ev.evaluate(str(model), str(toy_npz), out=tmp_path / "mine.json", **kw)
    assert (tmp_path / "mine-generated.safetensors").read_bytes() == b"a user's file"
    assert not (tmp_path / "mine.json").exists()


def test_a_run_killed_while_sampling_resumes_at_its_last_batch(tiny_cascade_dir, toy_npz, small_feature_net,
                                                               tmp_path, monkeypatch):
    """The images so far are saved after every batch: a run killed in its third batch of two images loses that batch
    only; the rerun samples the rest and measures the same images an uninterrupted run makes (per-image seeds)."""
    import imagen_transfer.evaluate as ev
    import imagen_transfer.sampling as sampling

    kw = dict(split="test", n=6, batch_size=2, sampling=dict(steps=1), feature_net=str(small_feature_net),
              judge=False, bicubic_baseline=True, progress=False)
    whole = ev.evaluate(str(tiny_cascade_dir), str(toy_npz), out=tmp_path / "whole.json", **kw)
    calls = []
    real_sample_stage = sampling.sample_stage

    def killed_in_the_third_batch(stage, *a, **k):
        calls.append(stage.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_sample_stage(stage, *a, **k)

    monkeypatch.setattr(sampling, "sample_stage", killed_in_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(str(tiny_cascade_dir), str(toy_npz), out=tmp_path / "cut.json", **kw)
    from safetensors.torch import load_file

    kept = load_file(tmp_path / "cut-generated.safetensors")
    assert len(kept["images"]) == 4 and len(kept["base_images"]) == 4 and not (tmp_path / "cut.json").exists()
    calls.clear()
    resumed = ev.evaluate(str(tiny_cascade_dir), str(toy_npz), out=tmp_path / "cut.json", **kw)
    assert calls == ["base", "sr"] and resumed["generated_images"]["reused"] == 4  # the third batch only
    cut, uncut = (load_file(tmp_path / f"{name}-generated.safetensors") for name in ("cut", "whole"))
    assert all(torch.equal(cut[k], uncut[k]) for k in uncut)  # same batches of the same seeds: the same images
    for k in ("kid_mean", "fid", "precision", "recall"):
        assert resumed[k] == pytest.approx(whole[k], rel=1e-6, abs=1e-9)
        assert resumed["bicubic_baseline"][k] == pytest.approx(whole["bicubic_baseline"][k], rel=1e-6, abs=1e-9)


def test_features_are_measured_in_cached_pieces(small_feature_net, toy_npz, monkeypatch):
    """A feature pass keeps each piece of images it measured (keyed by their pixels): a rerun measures only the pieces
    it lacks, with the same features as one pass; a real split, cached whole, leaves no pieces behind."""
    import imagen_transfer.measure as ev
    from imagen_transfer.metrics import load_feature_net

    net, net_id = load_feature_net(str(small_feature_net))
    images = torch.randint(0, 256, (7, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(ev, "FEATURE_CHUNK", 3)
    measured = []
    real_extract = ev.extract_features
    monkeypatch.setattr(ev, "extract_features", lambda net, x, **k: measured.append(len(x)) or real_extract(net, x, **k))
    first, files = ev.cached_features(net, net_id, images, progress=False)
    assert measured == [3, 3, 1] and len(set(files)) == 3
    close = dict(rtol=1e-5, atol=1e-5)  # another batch size may sum the convolutions in another order (float32)
    assert torch.allclose(first, real_extract(net, images, progress=False), **close)
    files[1].unlink()  # as if killed while measuring the second piece
    again, _ = ev.cached_features(net, net_id, images, progress=False)
    assert measured == [3, 3, 1, 3] and torch.equal(again, first)
    other, _ = ev.cached_features(net, net_id, images.flip(0), progress=False)  # other pixels: measured afresh
    assert measured == [3, 3, 1, 3, 3, 3, 1] and torch.allclose(other, first.flip(0), **close)
    pieces = ev.cache_root() / "features" / "pieces"
    before = set(pieces.iterdir())
    ev.reference_features(str(toy_npz), "test", 32, net, net_id, progress=False)
    assert set(pieces.iterdir()) == before


def test_a_preview_scores_the_protocols_first_images_once_and_changes_nothing(tiny_cascade_dir, toy_npz,
                                                                              small_feature_net, monkeypatch,
                                                                              capsys):
    """--preview: the first images' KID against the preview's real features, printed before the rest is sampled;
    every image is sampled once, and the full result is the one without a preview."""
    import imagen_transfer.evaluate as ev
    import imagen_transfer.sampling as sampling
    from imagen_transfer.measure import feature_network, preview_reference
    from imagen_transfer.metrics import extract_features, kid
    from imagen_transfer.sources import open_source

    calls = []
    real_sample_stage = sampling.sample_stage
    monkeypatch.setattr(sampling, "sample_stage",
                        lambda stage, *a, **k: calls.append(len(a[0].mask)) or real_sample_stage(stage, *a, **k))
    kw = dict(split="test", n=12, batch_size=4, sampling=dict(steps=1), feature_net=str(small_feature_net),
              judge=False)
    with_look = ev.evaluate(str(tiny_cascade_dir), str(toy_npz), preview=4, **kw)
    assert "first look after" in capsys.readouterr().out
    assert sum(calls) == 2 * 12  # base and SR, each image once
    plain = ev.evaluate(str(tiny_cascade_dir), str(toy_npz), preview=0, progress=False, **kw)
    assert "preview" not in plain and (with_look["kid_mean"], with_look["fid"]) == (plain["kid_mean"], plain["fid"])
    look = with_look["preview"]
    assert look["n"] == 4 and look["n_real"] == 24 and look["kid_subset_size"] == 4 and look["seconds"] > 0
    dataset = open_source(str(toy_npz))
    from imagen_transfer.datasets import load_dataset

    data = load_dataset(dataset, "test", resolution=32, channels=3)
    net, net_id = feature_network(str(small_feature_net), ev.PREVIEW_PRECISION)
    real, _ = preview_reference(dataset, "test", 32, data, net, net_id)
    first = ev.sample_cascade(ev.open_model(str(tiny_cascade_dir)), ev.draw_captions(data, 12, 0)[0][:4],
                              list(range(4)), steps=1, progress=False)
    fake = extract_features(net,
                            sampling.to_uint8(first).expand(-1, -1, -1, 3), progress=False)
    assert look["kid_mean"] == pytest.approx(kid(real, fake)[0], rel=1e-6, abs=1e-9)


def test_bf16_features_are_close_to_fp32_and_cached_apart(toy_npz, small_feature_net):
    """The bf16 feature network: its own id (a cache never mixes the two), features within bf16's rounding of
    fp32's (8 significant bits: a relative change of a few 1e-3 per layer, here 2 layers)."""
    from imagen_transfer.datasets import load_dataset
    from imagen_transfer.measure import feature_network, reference
    from imagen_transfer.metrics import extract_features

    images = load_dataset(str(toy_npz), "test", resolution=32, channels=3).images
    (fp32, id32), (bf16, id16) = feature_network(str(small_feature_net)), feature_network(str(small_feature_net),
                                                                                            "bf16")
    assert id16 == f"{id32}-bf16" and next(bf16.net.parameters()).dtype == torch.bfloat16
    assert next(fp32.net.parameters()).dtype == torch.float32  # the fp32 network is left as it was
    a, b = extract_features(fp32, images, progress=False), extract_features(bf16, images, progress=False)
    assert b.dtype == torch.float32 and 0 < ((a - b).norm(dim=1) / a.norm(dim=1)).max() < 0.03
    r32 = reference(str(toy_npz), "test", 32, feature_net=str(small_feature_net), progress=False)
    r16 = reference(str(toy_npz), "test", 32, feature_net=str(small_feature_net), feature_precision="bf16",
                    progress=False)
    assert r32.info["reference_cache"] != r16.info["reference_cache"]
    assert torch.allclose(r16.features, b) and torch.allclose(r32.features, a)


def test_a_shipped_judge_is_used_for_its_own_data_file_only(toy_npz, tmp_path, monkeypatch):
    """scripts/ship_judge.py trains the judge as a first evaluation would and ships it under its key; with an empty
    cache the shipped judge is read (never retrained), and a file with other contents trains its own."""
    import importlib.util
    import shutil

    from conftest import REPO

    from imagen_transfer import judge as judges
    from imagen_transfer.errors import UserError

    spec = importlib.util.spec_from_file_location("ship_judge", REPO / "scripts" / "ship_judge.py")
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)
    into = tmp_path / "shipped"
    monkeypatch.setenv("IMAGEN_TRANSFER_CACHE", str(tmp_path / "cache-0"))
    assert ship.main(["--data", str(toy_npz), "--resolution", "16", "--into", str(into)]) == 0
    (folder,) = into.iterdir()
    assert (folder / "README.md").read_text().count("accuracy on the real `test` split") == 1
    with pytest.raises(UserError, match="shipped already"):
        ship.main(["--data", str(toy_npz), "--resolution", "16", "--into", str(into)])
    monkeypatch.setattr(judges, "SHIPPED", into)
    monkeypatch.setenv("IMAGEN_TRANSFER_CACHE", str(tmp_path / "cache-1"))  # empty: only the shipped one can answer
    trained = []
    monkeypatch.setattr(judges, "train_judge", lambda *a, **k: trained.append(1) or judges.build_judge(2).eval())
    judge, info = judges.load_or_train_judge(str(toy_npz), 16, progress=False)
    assert info["shipped"] and not trained
    shipped = judges.load_file(folder / "judge.safetensors")
    assert all(torch.equal(shipped[k], v) for k, v in judge.state_dict().items())
    other = tmp_path / "other.npz"
    shutil.copy(toy_npz, other)
    with open(other, "ab") as f:  # the same name's content changed: the key changes with it
        f.write(b"\0")
    _, info = judges.load_or_train_judge(str(other), 16, progress=False)
    assert not info["shipped"] and trained == [1]


def test_the_demos_data_files_have_their_shipped_judges():
    """The judges shipped in models/judges/ still answer to the key of the data they were made for (a key change,
    e.g. JUDGE_VERSION, without shipping again would silently bring back their training)."""
    from imagen_transfer.errors import UserError
    from imagen_transfer.judge import SHIPPED, judge_key
    from imagen_transfer.sources import open_source

    for name, resolution in (("pneumoniamnist", 32), ("pneumoniamnist", 16), ("cifar10", 32)):  # the demo, --quick
        try:
            source = open_source(name)
        except UserError:
            pytest.skip("IMAGEN_TRANSFER_DATA does not hold the shared data sets")
        folder = SHIPPED / judge_key(source, resolution)
        assert (folder / "judge.json").is_file(), f"no shipped {name} judge at {resolution} px: scripts/ship_judge.py"
