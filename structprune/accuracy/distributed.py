"""Running under ``torchrun``: one process per device, DistributedDataParallel, data shards.

Under ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1 in the environment) the training
commands join the process group (gloo on CPU, nccl on GPU), train a DDP-wrapped model on a
shard of the training batches each, reduce metrics over every rank's share of the
validation batches, and let rank 0 alone write files. In a single process all of it is a
no-op.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler


def start() -> bool:
    """Join the process group when launched by torchrun with several processes."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def shard(batches: Iterable[Any], seed: int = 0) -> Iterable[Any]:
    """This rank's share of ``batches``: a DataLoader gets a DistributedSampler (shuffled by
    ``seed`` when the loader shuffled), a list every ``world_size``-th batch."""
    if not active():
        return batches
    if isinstance(batches, DataLoader):
        shuffle = not isinstance(batches.sampler, torch.utils.data.SequentialSampler)
        sampler = DistributedSampler(batches.dataset, shuffle=shuffle, seed=seed)
        return DataLoader(batches.dataset, batch_size=batches.batch_size, sampler=sampler,
                          num_workers=batches.num_workers, collate_fn=batches.collate_fn)
    return list(batches)[rank()::world_size()]


def wrap(model: nn.Module) -> nn.Module:
    """The model DDP-wrapped when running distributed (gradients averaged over ranks)."""
    return nn.parallel.DistributedDataParallel(model) if active() else model


def sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), as the model it saves."""
    if active():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def gather(values: Any) -> list[Any]:
    """Every rank's ``values`` (picklable), in rank order; ``[values]`` in one process."""
    if not active():
        return [values]
    found: list[Any] = [None] * world_size()
    dist.all_gather_object(found, values)
    return found


def weights_digest(model: nn.Module) -> str:
    """A hash of the model's parameters, to check that ranks agree (BatchNorm statistics
    are each rank's own until DDP broadcasts rank 0's at the next forward)."""
    digest = hashlib.sha256()
    for name, tensor in model.named_parameters():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
