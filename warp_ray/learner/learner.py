"""A learner: one RL run of T REINFORCE steps, its K DeepSpeed ranks and its rollout worker.

Each step: draw prompts (the learner's own order, from its seed), sample completions from
the rollout worker, score them on the reward server, update the policy on the K ranks
(each on whole prompts' groups of samples, so the leave-one-out baseline stays within a
prompt), then push the new weights to the rollout worker.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Sequence

import ray
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from warp_ray.config import WarpConfig
from warp_ray.learner.rank import LearnerRank
from warp_ray.rollout.worker import RolloutWorker


class Learner:
    def __init__(self, config: WarpConfig, init: str | Path, prompts: Sequence[str], reward_server, seed: int):
        warp, K = config.warp, config.resources.ranks_per_learner
        if warp.batch_size % K:
            raise ValueError(f"warp.batch_size = {warp.batch_size} must be a multiple of resources.ranks_per_learner = {K}")
        self.config, self.prompts, self.reward_server = config, list(prompts), reward_server
        self.order = random.Random(seed)
        self.tokenizer = AutoTokenizer.from_pretrained(init)
        micro_batch = warp.batch_size // K * warp.samples_per_prompt
        self.ranks = [LearnerRank.remote(rank, K, config, micro_batch) for rank in range(K)]
        address, port = ray.get(self.ranks[0].rendezvous.remote())
        ray.get([rank.setup.remote(address, port, str(init)) for rank in self.ranks])
        self.rollout = RolloutWorker.remote(str(init), max_model_len=self.tokenizer.model_max_length, seed=seed)
        self.check_engine_agrees(self.prompts[:4])

    def check_engine_agrees(self, prompts: list[str], tokens: int = 16) -> None:
        """The rollout engine must sample from the policy being trained: their greedy completions match."""
        engine = [c[0]["token_ids"] for c in ray.get(self.rollout.generate.remote(prompts, 1, 0.0, tokens))]
        policy = ray.get(self.ranks[0].greedy.remote([self.tokenizer(p).input_ids for p in prompts], tokens))
        if engine != policy:
            raise RuntimeError(f"the rollout engine and the policy disagree on greedy completions: {engine} vs {policy}")

    def run(self, steps: int, log: Path | None = None) -> list[dict[str, float]]:
        """`steps` REINFORCE steps with a progress bar; each step's metrics appended to `log` (JSONL)."""
        history = []
        with tqdm(range(steps), desc="learner", unit="step") as bar:
            for step in bar:
                metrics = {"step": step + 1, **self.step()}
                history.append(metrics)
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl_to_anchor']:.3f}")
                if log is not None:
                    with open(log, "a") as f:
                        f.write(json.dumps(metrics) + "\n")
        return history

    def step(self) -> dict[str, float]:
        start = time.perf_counter()
        warp = self.config.warp
        prompts = [self.order.choice(self.prompts) for _ in range(warp.batch_size)]
        samples = ray.get(self.rollout.generate.remote(prompts, warp.samples_per_prompt, warp.temperature, warp.max_new_tokens))
        rows = [(prompt, sample) for prompt, group in zip(prompts, samples) for sample in group]
        rewards = torch.tensor(ray.get(self.reward_server.score.remote([p for p, _ in rows], [s["text"] for _, s in rows])))
        input_ids, attention, completion = self.pack(rows)
        shards = [slice(i, i + len(rows) // len(self.ranks)) for i in range(0, len(rows), len(rows) // len(self.ranks))]
        stats = ray.get([rank.step.remote(input_ids[s], attention[s], completion[s], rewards[s]) for rank, s in zip(self.ranks, shards)])
        sync_seconds = ray.get(self.rollout.update_weights.remote(self.ranks[0].policy_state_dict.remote()))
        metrics = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        seconds = time.perf_counter() - start
        metrics.update(seconds=seconds, sync_seconds=sync_seconds, tokens_per_s=int(completion.sum()) / seconds)
        return metrics

    def pack(self, rows: list[tuple[str, dict]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded prompt + completion token rows, their attention mask and completion mask,
        from the token ids the engine generated with (no second tokenization of the prompts)."""
        sequences = [(s["prompt_token_ids"], s["token_ids"]) for _, s in rows]
        length = max(len(p) + len(c) for p, c in sequences)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id)
        attention = torch.zeros(len(rows), length, dtype=torch.long)
        completion = torch.zeros(len(rows), length, dtype=torch.long)
        for i, (p, c) in enumerate(sequences):
            input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            attention[i, : len(p) + len(c)] = 1
            completion[i, len(p) : len(p) + len(c)] = 1
        return input_ids, attention, completion

    def policy_state_dict(self) -> dict[str, torch.Tensor]:
        return ray.get(self.ranks[0].policy_state_dict.remote())
