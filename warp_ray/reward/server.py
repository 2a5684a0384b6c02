"""The reward-server actor: one reward hosted for every learner, with requests batched.

`RewardServer` hosts a `RewardSource`: a reward model folder (a single RM or the WARM merge),
an ENS of several RM folders (M forward passes, for comparison), or a function of one
(prompt, completion) pair, such as a task's gold reward (a control reward for evaluation).
Many learners call `score` concurrently; the calls wait in a bounded queue and a batching loop
serves them together, up to `max_batch_size` pairs: every request waiting when a batch starts
(those that came while the last one was scored), then any arriving within `max_wait_ms`, so
that M learners share one model. A bad
request is answered with an error naming the problem; the others, and the server, go on.
If the server's process dies, Ray starts it again and retries the requests in flight
(`warp_ray.runtime.SERVICE`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import ray
import torch

from warp_ray.chat import Prompt, messages_problem
from warp_ray.config import RewardServerParams
from warp_ray.replicas import start_replicas
from warp_ray.runtime import SERVICE, actor_device, gpu_options, log_if_restarted


@dataclass(frozen=True)
class RewardSource:
    """What a reward server hosts: reward model folders (one: a single RM or WARM's merge; several:
    their ENS, the mean of their scores), or a function r(prompt, completion)."""

    folders: tuple[str, ...] = ()
    function: Optional[Callable[[str, str], float]] = None

    def __post_init__(self) -> None:
        if bool(self.folders) == (self.function is not None):
            raise ValueError("a reward source is reward model folders or a function, one of the two")


class Reward:
    """r(x, y) for a batch, from a `RewardSource`."""

    def __init__(self, source: RewardSource, trust_remote_code: bool, device: torch.device):
        self.function = source.function
        self.models = None
        if source.folders:
            # Imported here, not at the top: a function's server (the built-in task's gold reward, which
            # every evaluator on that task starts) then imports no transformers, 4 s less to start on 2 cores.
            from warp_ray.reward.model import RewardModels

            self.models = RewardModels(source.folders, trust_remote_code, device)

    def check(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> None:
        if not isinstance(prompts, (list, tuple)) or not isinstance(completions, (list, tuple)):
            raise ValueError("score takes two lists: prompts (text or chat messages) and completions (text)")
        if not prompts:
            raise ValueError("score needs at least one (prompt, completion) pair, got an empty list")
        if len(prompts) != len(completions):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(completions)} completions: give one completion per prompt"
            )
        for i, (p, c) in enumerate(zip(prompts, completions)):
            if not isinstance(c, str):
                raise ValueError(f"pair {i}: the completion must be a string, got {type(c).__name__}")
            if not isinstance(p, str) and (problem := messages_problem(p)):
                raise ValueError(f"pair {i}: the prompt: {problem}")
            if not isinstance(p, str) and self.function is not None:
                raise ValueError(f"pair {i}: a reward function takes text prompts, and this prompt is chat messages")
        if self.models is not None:
            self.models.check_lengths(prompts, completions)

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str]) -> list[float]:
        if self.function is not None:
            return [self.function(p, c) for p, c in zip(prompts, completions)]
        return self.models(prompts, completions)


def start_reward_server(source: RewardSource, params: RewardServerParams, trust_remote_code: bool = False):
    """A reward server on the resources its params give (a GPU for reward models when asked; a
    function's server never takes one); for reward models, `params.replicas` of them behind one
    `warp_ray.replicas.Replicas` handle."""
    options = gpu_options(params.gpus if source.folders else 0)

    def start(**replica):
        return RewardServer.options(**options, **replica).remote(source, params, trust_remote_code)

    return start_replicas(start, params.replicas if source.folders else 1)


@ray.remote(**SERVICE)
class RewardServer:
    def __init__(
        self,
        source: RewardSource,
        params: RewardServerParams | None = None,
        trust_remote_code: bool = False,
    ):
        log_if_restarted("the reward server")
        params = params or RewardServerParams()
        torch.set_num_threads(max(1, params.threads))
        device = actor_device(params.gpus if source.folders else 0, "the reward server")
        self.reward = Reward(source, trust_remote_code, device)
        self.params = params
        self.queue: asyncio.Queue | None = None
        self.served = {"requests": 0, "pairs": 0, "batches": 0}

    async def score(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        """Rewards of the (prompt, completion) pairs, in order. A reward model reads each pair as
        `warp_ray.chat.reward_text` renders it with its own tokenizer and chat template."""
        self.reward.check(prompts, completions)
        if self.queue is None:  # created here, in the actor's event loop
            self.queue = asyncio.Queue(maxsize=self.params.max_queue)
            asyncio.get_running_loop().create_task(self._serve())
        answer = asyncio.get_running_loop().create_future()
        await self.queue.put((list(prompts), list(completions), answer))
        return await answer

    async def stats(self) -> dict[str, int]:
        return dict(self.served)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.params.max_wait_ms / 1000
            while sum(len(r[0]) for r in batch) < self.params.max_batch_size:
                if not self.queue.empty():  # arrived while the last batch was scored: no wait to join this one
                    batch.append(self.queue.get_nowait())
                    continue
                if loop.time() >= deadline:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), deadline - loop.time()))
                except asyncio.TimeoutError:
                    break
            prompts = [p for r in batch for p in r[0]]
            completions = [c for r in batch for c in r[1]]
            try:
                # In a thread: the event loop keeps taking requests while the model runs.
                scores = await asyncio.to_thread(self.reward, prompts, completions)
            except Exception as error:  # one failed batch fails its requests, not the server
                for *_, answer in batch:
                    answer.set_exception(error)
                continue
            start = 0
            for request_prompts, _, answer in batch:
                answer.set_result(scores[start : start + len(request_prompts)])
                start += len(request_prompts)
            self.served["requests"] += len(batch)
            self.served["pairs"] += len(prompts)
            self.served["batches"] += 1
