"""The probe protocol, one for every task (probe.py: classification and retrieval on pooled features; dense_probe.py:
detection and segmentation on feature grids):

- features are standardised with the training split's statistics (`standardise`), never the evaluated split's;
- the head's hyper-parameters (view, learning rate) are chosen on validation and reported on test (`choose`);
- feature fusion concatenates the standardised inputs of two or more sets (`check_fuse` names the groups);
- label efficiency retrains the chosen head on seeded subsets of the training labels (`labelled_subset`), several
  seeds, mean and std in the table (probe_report.efficiency_table);
- the heads each task trains are named next to the heads (`TASK_HEADS`).
"""

from __future__ import annotations

import torch

from . import detection, segmentation
from .errors import UserError

CLASSIFICATION_HEADS = ("linear", "mlp")  # probe.py's pooled-feature heads; the first is the default
TASK_HEADS = {"classification": CLASSIFICATION_HEADS, "retrieval": (), "detection": detection.HEADS,
              "segmentation": segmentation.HEADS}


def check_head(task: str, head: str | None) -> str | None:
    """The head a task trains (None: the task's default); a head the task does not have is one error line."""
    valid = TASK_HEADS[task]
    if head is None:
        return valid[0] if valid else None
    if head not in valid or task == "detection":
        raise UserError(f"--head {head} does not apply to --task {task} (valid: "
                        f"{', '.join(valid) if valid and task != 'detection' else 'none, it has a fixed head'})")
    return head


def standardise(x: dict[str, torch.Tensor], dims: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """{split: features} standardised by the train split's mean and std over `dims` (examples, and the grid for
    maps), so no statistic of an evaluated split leaks into its inputs."""
    mean = x["train"].mean(dim=dims, keepdim=True)
    std = x["train"].std(dim=dims, keepdim=True).clamp_min(1e-6)
    return {s: (v - mean) / std for s, v in x.items()}


def check_fuse(groups: list[list[str]] | None, available) -> list[list[str]]:
    """`--fuse A+B` groups, each of two or more known feature sets; one error line otherwise."""
    for group in groups or []:
        if len(group) < 2 or not set(group) <= set(available):
            raise UserError(f"--fuse needs two or more of {', '.join(available)} (got {'+'.join(group)})")
    return list(groups or [])


def choose(grid: list[dict], score) -> dict:
    """The grid entry with the best validation score (`score(entry)`, higher is better; the first of equals)."""
    return max(grid, key=score)


def labelled_subset(n: int, count: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of `count` of n training images drawn by `seed` (all of them for None or count >= n)."""
    if count is None or count >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values
