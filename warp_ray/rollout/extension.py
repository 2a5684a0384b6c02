"""Code that vLLM loads into its own workers, by name (`worker_extension_cls`).

New policy weights arrive as safetensors bytes: a format vLLM's RPC carries as it is (a
dict of tensors would arrive as lists) and that needs no pickle, so no insecure
serialization switch has to be turned on.
"""

from __future__ import annotations

from safetensors.torch import load


class WeightSync:
    """Mixed into vLLM's worker class: `collective_rpc("load_policy_weights", args=(payload,))`."""

    def load_policy_weights(self, payload: bytes) -> None:
        weights = load(payload)
        self.model_runner.reload_weights(weights_iterator=iter(weights.items()))
