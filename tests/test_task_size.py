"""The size and tiles `features` picks for a dense data set it has no size for (task_size.py)."""

import json
from types import SimpleNamespace

import pytest
import torch

from imagen_transfer.task_size import MAX_OBJECT, expected_seconds, object_side, plan_size, unet_gflops


@pytest.fixture(scope="module")
def sr(tiny_cascade):
    from imagen_transfer.text import load_text_encoder

    return tiny_cascade.stage("sr"), load_text_encoder(tiny_cascade.text_encoder)([""])


def test_object_side_is_the_median_box_side_or_the_smallest_class_median():
    boxes = [torch.tensor([[0.0, 0, 10, 30], [5, 5, 25, 15]]), torch.tensor([[0.0, 0, 40, 40]])]
    assert object_side(SimpleNamespace(task="detection", boxes=boxes)) == 10.0  # shorter sides 10, 10, 40
    masks = torch.zeros(3, 64, 64, dtype=torch.long)
    masks[:, :30, :30] = 1  # class 1: a 30 x 30 square in each image
    masks[:2, 40:50, 40:50] = 2  # class 2: 10 x 10 in two images, absent from the third (not a zero)
    assert object_side(SimpleNamespace(task="segmentation", masks=masks, class_names=["bg", "a", "b"])) == 10.0
    assert object_side(SimpleNamespace(task="detection", boxes=[torch.zeros(0, 4)])) is None


def test_flops_are_counted_without_running_and_attention_grows_with_the_square(sr):
    stage, text = sr
    (t32, a32), (t64, a64) = unet_gflops(stage, (32, 32), text), unet_gflops(stage, (64, 64), text)
    assert 0 < a32 < t32 and 0 < a64 < t64
    assert a64 / a32 == pytest.approx(16, rel=0.25)  # tokens x4 -> attention's T^2 x16 (the text part is linear)
    assert (t64 - a64) / (t32 - a32) == pytest.approx(4, rel=0.2)  # convolutions and projections: the area


def test_the_plan_scales_objects_to_the_unets_view_tiles_where_attention_dominates_and_meets_the_budget(sr):
    stage, text = sr
    big = plan_size(stage, (192, 192), 96.0, images=10, passes=2, unit=4, text=text, budget_s=1e9, rate=5.0)
    assert big.size == (96, 96) and "objects ~48 px" in big.note  # 96 px objects halved to MAX_OBJECT
    total, attention = unet_gflops(stage, big.tile, text)
    assert attention <= 0.5 * total and 96 % big.tile[0] == 0  # the tile cuts the image evenly
    assert big.seconds == pytest.approx(expected_seconds(stage, big.size, big.tile, 20, text, 5.0))
    small = plan_size(stage, (40, 40), 10.0, images=10, passes=2, unit=4, text=text, budget_s=1e9, rate=5.0)
    assert small.size == (40, 40)  # objects already under MAX_OBJECT: never enlarged
    tight = plan_size(stage, (192, 192), 96.0, images=10, passes=2, unit=4, text=text, budget_s=1e-9, rate=5.0)
    assert tight.size[0] < big.size[0] and "over the" in tight.note  # shrunk until objects reach MIN_OBJECT
    assert MAX_OBJECT == 48


def test_expected_seconds_is_the_arithmetic(sr):
    stage, text = sr
    per_tile = unet_gflops(stage, (32, 32), text)[0]
    assert expected_seconds(stage, (64, 64), (32, 32), 10, text, rate=2.0) == pytest.approx(10 * 4 * per_tile / 2)


def test_features_on_a_set_without_a_size_of_ours_prints_its_plan_and_reads_at_it(tiny_cascade_dir, tmp_path, capsys):
    from test_dense import make_masks

    from imagen_transfer.features import extract_dense

    seg = make_masks(tmp_path / "seg", n=8, size=96)  # discs of radius 5-9 px: objects under MAX_OBJECT
    out = extract_dense({"tiny": str(tiny_cascade_dir)}, str(seg), tmp_path / "f", blocks=["mid"], timesteps=[50],
                        baselines=(), progress=False)
    printed = capsys.readouterr().out
    assert "has no task size of ours: task size 96x96" in printed and "expected ~" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    tile = [int(v) for v in printed.split("tile ")[1].split(";")[0].split("x")]
    assert manifest["size"] == [96, 96] and manifest["tile"] == tile  # read as planned
    assert tile != [96, 96]  # attention dominates the tiny SR U-Net at 96 px: cut into tiles
