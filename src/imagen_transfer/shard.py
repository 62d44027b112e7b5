"""Sharded training of one stage (`train.shard: fsdp`): torch's FSDP2 (`fully_shard`) over the processes accelerate
started, on GPUs (NCCL) and on CPUs (gloo) alike.

Each down block, the mid block and each up block is one FSDP unit and the U-Net the root, so a process holds 1/N of
every weight, gradient, AdamW moment and EMA copy, and gathers one block's weights at a time for its forward and
backward (ZeRO-3; Rajbhandari et al. 2020, Zhao et al. 2023). accelerate's own FSDP plugin is not used: it engages
only on GPUs (accelerate 1.15 keeps a CPU run as plain multi-process), and the loop's checkpoints and EMA need the
full-state gathers below anyway.

The loop stays the same: every function here is the identity on an unsharded module, so `train_stage` calls them
unconditionally. Checkpoints stay full, unsharded safetensors (every rank takes part in the gather, rank 0 writes),
so a sharded run resumes on any number of processes and its cascade is an ordinary one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .transfer import prepare_transfer


def is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def shard_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """FSDP2 over the U-Net's blocks, then its root, after every rank took rank 0's weights (the same start as DDP's
    broadcast: sharding keeps each rank's own slice of its own copy)."""
    for tensor in [*unet.parameters(), *unet.buffers()]:
        dist.broadcast(tensor.data, src=0)
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        fully_shard(block)
    fully_shard(unet)
    return unet


def reshard(unet: torch.nn.Module) -> None:
    """Drop the gathered weights an inference forward left behind. FSDP2 keeps the root module's weights gathered
    after a forward without a backward (validation, sample grids); a later write into the sharded parameters (the
    EMA swap back) would then not reach the forward, which would train on the stale gathered copy."""
    if isinstance(unet, FSDPModule):
        unet.reshard()


def replicated(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor as a plain one, on its device (gathered from every rank when sharded: a collective); e.g.
    clip_grad_norm_'s total norm of sharded gradients."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU, for a checkpoint or the finished stage."""
    return replicated(tensor).detach().cpu()


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite, across ranks when they are sharded."""
    shards = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    ok = torch.stack([torch.isfinite(t).all() for t in shards]).all()
    if tensors and isinstance(tensors[0], DTensor):
        ok = ok.to(torch.int32)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def gathered_state(unet, named, ema, optimizer) -> tuple[dict, dict, dict]:
    """(model, EMA, optimizer) state as full tensors, keyed as an unsharded run keys them (so a checkpoint of either
    resumes the other). Sharded: every rank must call it, in the same order (each gather is a collective)."""
    if not is_sharded(unet):
        return (dict(unet.named_parameters()), {n: p for (n, _), p in zip(named, ema.shadow_params)},
                optimizer.state_dict())
    model = {n: full(p) for n, p in unet.named_parameters()}
    shadow = {n: full(p) for (n, _), p in zip(named, ema.shadow_params)}
    state = optimizer.state_dict()
    state["state"] = {index: {k: full(v) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
                      for index, entry in state["state"].items()}
    return model, shadow, state


def load_gathered_state(unet, named, ema, optimizer, saved: dict) -> list[str]:
    """Load a checkpoint's full state into the (maybe sharded) training state; returns the unexpected keys."""
    params = dict(unet.named_parameters())
    unexpected = sorted(set(saved["model"]) - set(params))
    with torch.no_grad():
        for name, tensor in saved["model"].items():
            if name in params:
                params[name].copy_(like(tensor, params[name]))
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    state = dict(saved["optimizer"])
    state["state"] = {index: {k: like(v, ordered[int(index)]) if isinstance(v, torch.Tensor) and v.dim() else v
                              for k, v in entry.items()}
                      for index, entry in saved["optimizer"]["state"].items()}
    optimizer.load_state_dict(state)
    ema.shadow_params = [like(saved["ema"][n], p) for n, p in named]
    return unexpected


def like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor placed as `param` is: sharded the same way when it is a DTensor, else on its device."""
    if isinstance(param, DTensor):
        return distribute_tensor(tensor.to(param.device_mesh.device_type, param.dtype), param.device_mesh,
                                 param.placements)
    return tensor.to(param.device)


def unsharded(unet: torch.nn.Module, transfer) -> torch.nn.Module:
    """An ordinary module holding the full weights (every rank gathers them): the same architecture rebuilt on the
    meta device and prepared by the same transfer method (adapters, DiffFit scales, trainable flags), then given the
    gathered tensors, so no second copy is ever initialised."""
    if not is_sharded(unet):
        return unet
    state = {n: full(p) for n, p in unet.named_parameters()}
    with torch.device("meta"):
        plain = UNet2DConditionModel.from_config(unet.config)
        prepare_transfer(plain, transfer)
    plain.load_state_dict(state, assign=True)
    return plain
