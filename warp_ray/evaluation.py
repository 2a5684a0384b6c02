"""Held-out evaluation of a policy served by rollout engines (docs/algorithms.md#evaluation-measures).

Completions of held-out prompts, sampled from the policy at `evaluation.temperature` (T, 1 by
default) within the run's length limit, give:
- the proxy reward (the reward the policy is trained against),
- the KL to the SFT, Monte-Carlo: mean over samples of sum_t [log pi_T(y_t) - log pi_sft,T(y_t)],
  an unbiased estimate of KL(pi_T || pi_sft,T), both policies' logits divided by T: log pi_T from
  the engine (vLLM's log-probs of the sampled tokens after temperature) and log pi_sft,T from a
  `ReferencePolicy` actor hosting the SFT. At T = 1 it is the KL between the policies themselves,
  the x-axis of the papers' fronts,
- the control reward, one training never saw, when one is given (the measure of hacking),
- truncated: the share of completions that the length limit cut.
Learners call it during training; the coordinator calls it on the points of the LITI front.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Mapping, Optional, Sequence

import ray
import torch
from transformers import AutoModelForCausalLM

from warp_ray.chat import Prompt, prompt_key
from warp_ray.config import WarpConfig
from warp_ray.logprobs import pack, token_logprobs
from warp_ray.replicas import start_replicas
from warp_ray.rollout.worker import sample
from warp_ray.runtime import SERVICE, actor_device, gpu_options, log_if_restarted

_STUDENT_T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
Z_975 = 1.96


def t_975(dof: int) -> float:
    """Student's t, 97.5% quantile, for `dof` degrees of freedom (beyond 10, 10's: a little wide)."""
    return _STUDENT_T_975.get(dof, _STUDENT_T_975[10])


@ray.remote(**SERVICE)
class ReferencePolicy:
    """A fixed policy (the SFT), scoring completions: sum_t log pi_sft(y_t | x, y_<t)."""

    def __init__(
        self,
        folder: str | Path,
        threads: int = 1,
        batch_size: int = 64,
        trust_remote_code: bool = False,
        gpus: float = 0,
        logprob_chunk: int = 0,
    ):
        """gpus: what Ray gave this actor (`start_reference`); the model runs on the GPU, in bf16,
        when above 0."""
        log_if_restarted("the reference policy")
        torch.set_num_threads(threads)
        device = actor_device(gpus, "the reference policy")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model = model.to(device).eval()
        self.logprob_chunk = logprob_chunk
        self.batch_size = batch_size

    @torch.no_grad()
    def sequence_logprobs(self, sequences: list[tuple[list[int], list[int]]], temperature: float = 1.0) -> list[float]:
        """One sum of completion log-probs per (prompt ids, completion ids) pair, of the policy at `temperature`."""
        sums = []
        for i in range(0, len(sequences), self.batch_size):
            batch = pack(sequences[i : i + self.batch_size], self.model.config.pad_token_id or 0)
            input_ids, attention, completion = (t.to(self.model.device) for t in batch)
            logits = self.model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits[:, :-1]
            logprobs = token_logprobs(logits, input_ids[:, 1:], temperature, self.logprob_chunk)
            sums += (logprobs * completion[:, 1:]).sum(-1).tolist()
        return sums


def start_reference(folder: str | Path, config: WarpConfig):
    """The SFT's `ReferencePolicy`, on the GPUs `evaluation.reference_gpus` gives it;
    `evaluation.reference_replicas` of them behind one `warp_ray.replicas.Replicas` handle."""
    gpus = config.evaluation.reference_gpus

    def start(**replica):
        return ReferencePolicy.options(**gpu_options(gpus), **replica).remote(
            str(folder),
            batch_size=config.micro_batch_size if gpus else 64,
            trust_remote_code=config.paths.trust_remote_code,
            gpus=gpus,
            logprob_chunk=config.resources.logprob_chunk,
        )

    return start_replicas(start, config.evaluation.reference_replicas)


class Evaluator:
    """Evaluates whatever policy the given rollout engines hold, on the same held-out prompts
    and the same sampling seed every time, so that evaluations differ by the policy alone."""

    def __init__(
        self,
        config: WarpConfig,
        prompts: Sequence[Prompt],
        reward_server: Optional[object],
        reference,
        control_server: Optional[object] = None,
        rewards: Optional[Mapping[str, object]] = None,
    ):
        """Each sample scored by the proxy `reward_server` (its row's `reward`), the `control_server`
        (`control_reward`) and each of `rewards` (under its name), those that are not None."""
        self.prompts = list(prompts)[: config.evaluation.prompts]
        if not self.prompts:
            raise ValueError("evaluation needs held-out prompts, got none")
        self.config = config
        self.reward_server = reward_server
        self.reference = reference
        named = {"reward": reward_server, "control_reward": control_server, **(rewards or {})}
        self.scorers = {key: server for key, server in named.items() if server is not None}

    def __call__(self, rollouts: list) -> dict[str, float | list[float]]:
        """The means over the held-out samples (reward, kl_to_sft, truncated, control_reward), each
        with its standard error (`<key>_se`), and the per-prompt means of the measures a claim
        compares (`<key>_by_prompt`, in prompt order: what a bootstrap over prompts resamples)."""
        return summarise(self.samples(rollouts))

    def samples(self, rollouts: list) -> list[dict]:
        """One row per held-out sample: prompt, completion and its measures (pairing samples of two
        policies by position compares them on the same prompts, as a win rate does)."""
        params = self.config.evaluation
        groups = sample(
            rollouts,
            self.prompts,
            params.samples_per_prompt,
            params.temperature,
            self.config.warp.max_new_tokens,
            seed=self.config.warp.seed,
        )
        prompts = [p for p, group in zip(self.prompts, groups) for _ in group]
        samples = [s for group in groups for s in group]
        completions = [s["text"] for s in samples]
        calls = {}  # one per server: the proxy's may be the control's (warp.proxy_reward = gold)
        for server in self.scorers.values():
            if id(server) not in calls:
                calls[id(server)] = server.score.remote(prompts, completions)
        scored = {key: calls[id(server)] for key, server in self.scorers.items()}
        sequences = [(s["prompt_token_ids"], s["token_ids"]) for s in samples]
        sft = ray.get(self.reference.sequence_logprobs.remote(sequences, params.temperature))
        rows = [
            {"prompt": p, "completion": c, "kl_to_sft": sum(s["logprobs"]) - ref, "truncated": float(s["truncated"])}
            for p, c, s, ref in zip(prompts, completions, samples, sft)
        ]
        for key, values in zip(scored, ray.get(list(scored.values()))):
            for row, value in zip(rows, values):
                row[key] = value
        return rows


def prompt_means(rows: Sequence[dict], key: str) -> list[float]:
    """The mean of `key` over each prompt's samples, prompts in order of first appearance."""
    by_prompt: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        by_prompt[prompt_key(row["prompt"])].append(row[key])
    return [statistics.mean(values) for values in by_prompt.values()]


def mean_and_se(rows: Sequence[dict], key: str) -> tuple[float, float]:
    """The mean of `key` over the rows and its standard error with prompts as the unit: samples of
    one prompt are not independent, so the SE is that of the per-prompt means (prompts with equal
    numbers of samples, as an evaluation draws them); NaN from a single prompt."""
    return _mean_and_se(prompt_means(rows, key))


def summarise(
    rows: Sequence[dict], keys: Sequence[str] = ("reward", "kl_to_sft", "truncated", "control_reward")
) -> dict:
    """For each of `keys` the rows have: its mean, standard error (`<key>_se`) and, but for
    truncated, its per-prompt means (`<key>_by_prompt`, in prompt order: what a bootstrap over
    prompts resamples)."""
    summary = {}
    for key in keys:
        if key in rows[0]:
            per_prompt = prompt_means(rows, key)
            summary[key], summary[f"{key}_se"] = _mean_and_se(per_prompt)
            if key != "truncated":
                summary[f"{key}_by_prompt"] = per_prompt
    return summary


def _mean_and_se(means: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(means), (statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else math.nan)
