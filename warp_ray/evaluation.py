"""Held-out evaluation of a policy served by rollout engines, as spec/ALGORITHMS.md measures it.

Completions of held-out prompts, sampled from the policy at temperature 1, give:
- the proxy reward (the reward the policy is trained against),
- the KL to the SFT, Monte-Carlo: mean over samples of sum_t [log pi(y_t) - log pi_sft(y_t)],
  with log pi from the engine (vLLM's raw log-probs of the sampled tokens) and log pi_sft
  from a `ReferencePolicy` actor hosting the SFT,
- the control reward, one training never saw, when one is given (the measure of hacking).
Learners call it during training; the coordinator calls it on the points of the LITI front.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import ray
import torch
from transformers import AutoModelForCausalLM

from warp_ray.config import WarpConfig
from warp_ray.learner.reinforce import pack, token_logprobs
from warp_ray.rollout.worker import sample
from warp_ray.runtime import SERVICE, log_if_restarted


@ray.remote(**SERVICE)
class ReferencePolicy:
    """A fixed policy (the SFT), scoring completions: sum_t log pi_sft(y_t | x, y_<t)."""

    def __init__(self, folder: str | Path, threads: int = 1, batch_size: int = 64, trust_remote_code: bool = False):
        log_if_restarted("the reference policy")
        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def sequence_logprobs(self, sequences: list[tuple[list[int], list[int]]]) -> list[float]:
        """One sum of completion log-probs per (prompt ids, completion ids) pair."""
        sums = []
        for i in range(0, len(sequences), self.batch_size):
            input_ids, attention, completion = pack(sequences[i : i + self.batch_size], self.model.config.pad_token_id or 0)
            logits = self.model(input_ids=input_ids, attention_mask=attention).logits[:, :-1]
            sums += (token_logprobs(logits, input_ids[:, 1:]) * completion[:, 1:]).sum(-1).tolist()
        return sums


class Evaluator:
    """Evaluates whatever policy the given rollout engines hold, on the same held-out prompts
    and the same sampling seed every time, so that evaluations differ by the policy alone."""

    def __init__(self, config: WarpConfig, prompts: Sequence[str], reward_server, reference,
                 control_server: Optional[object] = None):
        self.prompts = list(prompts)[: config.evaluation.prompts]
        if not self.prompts:
            raise ValueError("evaluation needs held-out prompts, got none")
        self.config, self.reward_server, self.reference, self.control_server = config, reward_server, reference, control_server

    def __call__(self, rollouts: list) -> dict[str, float]:
        """The means over the held-out samples: reward, kl_to_sft and control_reward."""
        rows = self.samples(rollouts)
        return {key: _mean([row[key] for row in rows]) for key in ("reward", "kl_to_sft", "control_reward") if key in rows[0]}

    def samples(self, rollouts: list) -> list[dict]:
        """One row per held-out sample: prompt, completion and its measures (pairing samples of two
        policies by position compares them on the same prompts, as a win rate does)."""
        params = self.config.evaluation
        groups = sample(rollouts, self.prompts, params.samples_per_prompt, params.temperature, self.config.warp.max_new_tokens,
                        seed=self.config.warp.seed)
        prompts = [p for p, group in zip(self.prompts, groups) for _ in group]
        samples = [s for group in groups for s in group]
        completions = [s["text"] for s in samples]
        rewards = self.reward_server.score.remote(prompts, completions)
        control = self.control_server.score.remote(prompts, completions) if self.control_server else None
        sft = ray.get(self.reference.sequence_logprobs.remote([(s["prompt_token_ids"], s["token_ids"]) for s in samples]))
        rows = [{"prompt": p, "completion": c, "reward": r, "kl_to_sft": sum(s["logprobs"]) - ref}
                for p, c, r, s, ref in zip(prompts, completions, ray.get(rewards), samples, sft)]
        if control is not None:
            for row, value in zip(rows, ray.get(control)):
                row["control_reward"] = value
        return rows


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
