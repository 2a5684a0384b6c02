"""The reward of multi-objective RL: sum_k lambda_k R_k(x, y), from the reward servers of R_1..R_K.

A learner calls it as it calls a reward server (`score`); it asks every server at once and
weighs their answers, so each reward keeps its one server (its model loaded once) however many
weightings train against it."""

from __future__ import annotations

import asyncio
from typing import Sequence

import ray


def weighted_sum(lambdas: Sequence[float], scores: Sequence[Sequence[float]]) -> list[float]:
    """sum_k lambda_k scores[k][i], for every pair i."""
    return [sum(weight * score for weight, score in zip(lambdas, pair)) for pair in zip(*scores)]


@ray.remote(num_cpus=0)
class WeightedReward:
    def __init__(self, servers: Sequence, lambdas: Sequence[float]):
        """`servers`: the reward servers (or their `Replicas`) of R_1..R_K; `lambdas`: one weight each."""
        if len(servers) != len(lambdas):
            raise ValueError(f"got {len(lambdas)} lambdas for {len(servers)} rewards: give one lambda per reward")
        self.servers, self.lambdas = list(servers), list(lambdas)

    async def score(self, prompts: list, completions: list[str]) -> list[float]:
        scores = await asyncio.gather(*(server.score.remote(prompts, completions) for server in self.servers))
        return weighted_sum(self.lambdas, scores)
