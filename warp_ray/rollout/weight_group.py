"""A broadcast group between a learner's rank 0 and its rollout engines' workers.

The design of OpenRLHF and verl: rank 0 sends each tensor once, with a collective broadcast,
straight into the engines' processes, instead of serializing the model through a store.
Its own process group (a TCPStore hosted by rank 0, then NCCL on GPU or gloo on CPU) leaves
the learner's DeepSpeed group and vLLM's own group untouched. Group rank 0 is the learner,
rank 1 + i the worker of engine i.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import ray
import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=10)


def free_address() -> tuple[str, int]:
    """This node's address and a port free on it, for the group's store."""
    with socket.socket() as s:
        s.bind(("", 0))
        return ray.util.get_node_ip_address(), s.getsockname()[1]


def join(address: str, port: int, rank: int, world_size: int) -> dist.ProcessGroup:
    """Every member calls it at once; rank 0 hosts the store. NCCL where there is a GPU."""
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=TIMEOUT, wait_for_workers=False)
    if torch.cuda.is_available():
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT)


def broadcast_(group: dist.ProcessGroup, tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` into every member's `tensor` (same shape and dtype everywhere)."""
    group.broadcast(tensor, 0).wait()
    return tensor
