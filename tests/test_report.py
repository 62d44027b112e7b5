"""`report`: tables, curves and grids from a run folder; rendered in headless Chromium (installed by .ci/run)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch


def _make_run(root):
    from imagen_transfer.sampling import save_grid

    run = root / "run"
    (run / "samples").mkdir(parents=True)
    rows = [dict(stage="base", event="trainable", method="lora", trainable=10, total=1000, percent=1.0)]
    rows += [dict(stage="base", step=s, loss=0.1 / s, seconds_per_step=0.5, peak_memory_mb=900.0,
                  **({"val_loss": 0.05 + (s - 30) ** 2 / 1e5} if s % 10 == 0 else {})) for s in range(5, 65, 5)]
    rows += [dict(stage="base", step=60, loss=0.001, val_loss=0.06, early_stop=True),
             dict(stage="base", event="restore_best", step=30, val_loss=0.05)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "config.yaml").write_text("sample:\n  prompts: [chest x-ray, normal, chest x-ray, pneumonia]\n")
    save_grid(torch.rand(8, 3, 16, 16) * 2 - 1, run / "samples" / "base-step-0000060.png", nrow=4, scale=4)
    save_grid(torch.rand(8, 3, 32, 32) * 2 - 1, run / "eval-samples.png", nrow=4)
    (run / "eval.json").write_text(json.dumps(dict(split="test", resolution=16, n_generated=8, n_real=24, fid=12.5, kid_mean=0.01,
                                                   kid_std=0.002, precision=0.5, recall=0.25, conditioning_accuracy=0.75,
                                                   inception_score=None, inception_score_absent="no logits",
                                                   samples_grid="eval-samples.png")))
    (run / "eval-sr.json").write_text(json.dumps(dict(split="test", resolution=32, n_generated=8, n_real=24, fid=30.0,
                                                      kid_mean=0.03, bicubic_baseline=dict(
                                                          generator="stage base + bicubic upsampling to 32px",
                                                          split="test", resolution=32, fid=20.0, kid_mean=0.02))))
    return run


def test_report_tables_curves_and_embedded_images(tmp_path):
    from imagen_transfer.jobs.report import write_report

    run = _make_run(tmp_path)
    html_path, md_path = write_report(run)
    page, md = html_path.read_text(), md_path.read_text()
    assert (run / "curves.png").is_file()
    assert page.count("src='data:image/png;base64,") == 3  # curves, training grid, evaluation grid
    assert "http" not in page.replace("http-equiv", "")  # self-contained
    assert "| base | lora | 1 | 60 | 0.05 | 30 | 60 | 30 |" in md  # best val loss 0.05 at 30, stop 60, restored 30
    assert "| eval.json | test | 16 | 8 | 24 | 12.5 | 0.01 |" in md
    sr_row = md.index("| eval-sr.json | test | 32 | 8 | 24 | 30 | 0.03 |")  # an SR cascade, then its bicubic bar
    assert md.index("| eval-sr.json: stage base + bicubic upsampling to 32px | test | 32 | n/a | n/a | 20 | 0.02 |") > sr_row
    assert "rows: chest x-ray, normal, chest x-ray, pneumonia" in md
    assert "inception_score_absent: no logits" in page


def test_report_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    from imagen_transfer.jobs.cli import main

    assert main(["report", str(tmp_path)]) == 2
    assert "neither metrics.jsonl nor eval" in capsys.readouterr().err


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    if _chromium() is None or shutil.which("chromedriver") is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (see .ci/run)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    from imagen_transfer.jobs.report import write_report

    html_path, _ = write_report(_make_run(tmp_path))
    options = webdriver.ChromeOptions()
    options.binary_location = _chromium()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(html_path.resolve().as_uri())
        metrics = driver.find_element(By.ID, "metrics")
        assert metrics.is_displayed() and "12.5" in metrics.text and "0.75" in metrics.text
        assert "lora" in driver.find_element(By.ID, "training").text
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 3
        for img in images:  # decoded and laid out: a broken data URI has naturalWidth 0
            assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
            assert img.size["width"] > 0 and img.size["height"] > 0
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        driver.quit()


def test_report_shows_dense_probes_and_their_overlays(tmp_path):
    from PIL import Image

    from imagen_transfer.jobs.report import write_report

    run = _make_run(tmp_path)
    (run / "features").mkdir()
    per_class = {"RBC": dict(ap=0.5, ap50=0.875), "WBC": dict(ap=0.25, ap50=0.5)}
    detection = dict(task="detection", plots=["overlay-detection-source.png"],
                     sets={"source": dict(test=dict(map50=0.6875, map=0.375, per_class=per_class))})
    segmentation = dict(task="segmentation", plots=[], sets={"pixels": dict(test=dict(
        miou=0.8125, per_class={"background": dict(iou=0.9, dice=0.95), "nucleus": dict(iou=0.7, dice=0.8125)}))})
    (run / "features" / "probe-detection.json").write_text(json.dumps(detection))
    (run / "features" / "probe-segmentation.json").write_text(json.dumps(segmentation))
    Image.new("RGB", (8, 8)).save(run / "features" / "overlay-detection-source.png")
    html_path, md_path = write_report(run)
    md = md_path.read_text()
    assert "| source | 0.6875 | 0.375 | 0.875 | 0.5 |" in md and "| pixels | 0.8125 | 0.95 | 0.8125 |" in md
    assert "Detection probe: overlay-detection-source" in md
    assert html_path.read_text().count("src='data:image/png;base64,") == 4
