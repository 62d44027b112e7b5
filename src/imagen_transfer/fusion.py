"""Model fusion in weight space: `imagen-transfer merge` writes an ordinary cascade folder.

Methods (all per stage, over every floating-point tensor of the U-Net):
- `average`: sum_i w_i theta_i with weights summing to 1 (default uniform). Two models with weights (1 - a, a) are
  the interpolation between them (Wortsman et al. 2022, WiSE-FT); several fine-tunes are a uniform soup (Wortsman
  et al. 2022, "Model soups"). `greedy_soup` adds fine-tunes in order of their score while the score improves.
- `task-arithmetic`: theta_base + lambda * sum_i w_i (theta_i - theta_base) (Ilharco et al. 2023).
- `ties`, `dare-linear`, `dare-ties`: the task vectors (theta_i - theta_base) merged with peft's implementations of
  TIES (Yadav et al. 2023: trim to the top-density magnitudes, elect a sign, disjoint mean) and DARE (Yu et al. 2024:
  drop a random 1 - density share, rescale), added to the base with scale lambda.
Stages can also be taken whole from another model (`stage_from`), e.g. a fine-tuned base with the source SR stage.
All models must share the architecture of each merged stage (checked, with the differing tensor named).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from peft.utils import merge_utils

from .errors import UserError

METHODS = ("average", "task-arithmetic", "ties", "dare-linear", "dare-ties")


def _state(stage) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in stage.unet.state_dict().items()}


def _check_compatible(states: list[dict[str, torch.Tensor]], names: list[str], stage: str) -> None:
    reference = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != reference.keys():
            missing = sorted(set(reference) ^ set(state))[:3]
            raise UserError(f"stage {stage}: {name} has a different architecture from {names[0]} (tensors {missing})")
        for k, v in state.items():
            if v.shape != reference[k].shape:
                raise UserError(f"stage {stage}: tensor {k} is {tuple(v.shape)} in {name} but "
                                f"{tuple(reference[k].shape)} in {names[0]}")


def merge_states(states: list[dict[str, torch.Tensor]], weights: list[float], method: str = "average",
                 base: dict[str, torch.Tensor] | None = None, scale: float = 1.0, density: float = 0.5,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """One merged state dict (see module doc). `base` is needed by every method but `average`."""
    if method not in METHODS:
        raise UserError(f"unknown merge method '{method}'; use one of {', '.join(METHODS)}")
    if method == "average":
        if abs(sum(weights) - 1) > 1e-6:
            raise UserError(f"averaging weights must sum to 1 (got {weights})")
        return {k: sum(w * s[k] for s, w in zip(states, weights)) for k in states[0]}
    if base is None:
        raise UserError(f"merge method '{method}' needs --base (the model the fine-tunes started from)")
    if not 0 < density <= 1:
        raise UserError(f"density must be in (0, 1] (got {density})")


    warnings.filterwarnings("ignore", message="The density .* no pruning will be performed")

    w = torch.tensor(weights, dtype=torch.float32)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # DARE's random drops
    merged = {}
    try:
        for k, theta0 in base.items():
            if not theta0.is_floating_point():
                merged[k] = theta0
                continue
            deltas = [s[k] - theta0 for s in states]
            if method == "task-arithmetic":
                delta = sum(wi * d for wi, d in zip(weights, deltas))
            elif method == "ties":
                delta = merge_utils.ties(deltas, w, density)
            elif method == "dare-linear":
                delta = merge_utils.dare_linear(deltas, w, density)
            else:
                delta = merge_utils.dare_ties(deltas, w, density)
            merged[k] = theta0 + scale * delta
    finally:
        torch.random.set_rng_state(generator_state)
    return merged


def merge_cascades(cascades: list, names: list[str], *, weights: list[float] | None = None, method: str = "average",
                   base=None, scale: float = 1.0, density: float = 0.5, stage_from: dict | None = None, seed: int = 0):
    """A new cascade: a copy of the first model with each stage merged (or taken whole from `stage_from`)."""
    if not cascades:
        raise UserError("merge needs at least one model")
    weights = list(weights) if weights else [1 / len(cascades)] * len(cascades)
    if len(weights) != len(cascades):
        raise UserError(f"{len(weights)} weights for {len(cascades)} models")
    if method == "average" and abs(sum(weights) - 1) > 1e-6:
        raise UserError(f"averaging weights must sum to 1 (got {weights})")
    out = copy.deepcopy(cascades[0])
    stage_from = stage_from or {}
    for stage in out.stages:
        if stage.name in stage_from:
            donor = stage_from[stage.name].stage(stage.name)
            stage.unet, stage.scheduler = copy.deepcopy(donor.unet), copy.deepcopy(donor.scheduler)
            stage.aug_level_sample = donor.aug_level_sample  # whole: its sampling level goes with its weights
            continue
        states = [_state(c.stage(stage.name)) for c in cascades]
        base_state = _state(base.stage(stage.name)) if base is not None else None
        _check_compatible(states + ([base_state] if base_state else []), names + (["base"] if base_state else []),
                          stage.name)
        if len(cascades) == 1 and method == "average":
            continue
        merged = merge_states(states, weights, method, base_state, scale, density, seed)
        dtype = next(stage.unet.parameters()).dtype
        stage.unet.load_state_dict({k: v.to(dtype) for k, v in merged.items()})
    out.info = dict(merged_from=names, method=method, weights=weights, scale=scale, density=density,
                    stage_from={k: str(v.info.get("run", "")) for k, v in stage_from.items()})
    return out


def greedy_soup(cascades: list, names: list[str], score: Callable[[object], float]) -> tuple[object, list[str]]:
    """Greedy soup (Wortsman et al. 2022, recipe 2): sort models by score (lower is better), then add each to the soup
    if the uniform average of the soup plus it scores better. Returns the soup and the names it kept."""
    scored = sorted(zip([score(c) for c in cascades], range(len(cascades))))
    kept = [scored[0][1]]
    best = scored[0][0]
    for _, i in scored[1:]:
        trial = merge_cascades([cascades[j] for j in kept + [i]], [names[j] for j in kept + [i]])
        trial_score = score(trial)
        if trial_score < best:
            kept.append(i)
            best = trial_score
    soup = merge_cascades([cascades[j] for j in kept], [names[j] for j in kept])
    soup.info["greedy_soup_score"] = best
    return soup, [names[j] for j in kept]
