"""Code that vLLM loads into its own workers, by name (`worker_extension_cls`).

Three ways in for new policy weights. Through the object store, they arrive as safetensors
bytes: a format vLLM's RPC carries as it is (a dict of tensors would arrive as lists) and
that needs no pickle, so no insecure serialization switch has to be turned on. Through the
broadcast group (warp_ray.rollout.weight_group), they stream tensor by tensor from the
learner's rank 0 straight into the model, in the order of the specs sent beforehand. In memory,
from an engine in a learner's rank (resources.colocate), they are tensors already.
"""

from __future__ import annotations

from typing import Iterator

import torch
from safetensors.torch import load

from warp_ray.rollout import weight_group


class WeightSync:
    """Mixed into vLLM's worker class, called through `collective_rpc`."""

    def load_policy_weights(self, payload: bytes) -> None:
        # Worker.reload_weights: the model runner's, inside vLLM's config context, which the reload reads.
        self.reload_weights(weights_iterator=iter(load(payload).items()))

    def load_policy_tensors(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """(name, tensor) pairs handed over in memory, by a caller in this process."""
        self.reload_weights(weights_iterator=weights)

    def join_weight_group(self, address: str, port: int, rank: int, world_size: int) -> None:
        self.weight_group = weight_group.join(address, port, rank, world_size)

    def receive_policy_weights(self, specs: list[tuple[str, str, list[int]]]) -> None:
        """specs: (name, dtype, shape) of every tensor, in the order rank 0 broadcasts them."""
        device = self.model_runner.device
        received = (
            (
                name,
                weight_group.broadcast_(
                    self.weight_group, torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                ),
            )
            for name, dtype, shape in specs
        )
        self.reload_weights(weights_iterator=received)
