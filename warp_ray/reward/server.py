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
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import ray

from warp_ray.chat import Prompt, messages_problem
from warp_ray.config import RewardServerParams
from warp_ray.replicas import start_replicas
from warp_ray.runtime import SERVICE, actor_device, gpu_options, log_if_restarted

if TYPE_CHECKING:
    import torch


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

    def __init__(self, source: RewardSource, trust_remote_code: bool, device: Optional[torch.device]):
        """`device`: the models' (None for a function)."""
        self.function = source.function
        self.models = None
        if source.folders:
            # Imported here, not at the top: a function's server (the built-in task's gold reward, which
            # every evaluator on that task starts) then imports neither transformers nor torch, and starts
            # in under half the time (docs/benchmarks.md).
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

    def __call__(self, prompts: Sequence[Prompt], completions: Sequence[str], max_pairs: int) -> list[float]:
        """The rewards, reward models scoring at most `max_pairs` pairs a forward pass."""
        if self.function is not None:
            return [self.function(p, c) for p, c in zip(prompts, completions)]
        return self.models(prompts, completions, max_pairs)


Request = tuple[list[Prompt], list[str], asyncio.Future]


async def take_batch(
    queue: asyncio.Queue, first: Request, max_pairs: int, max_wait_s: float
) -> tuple[list[Request], Optional[Request]]:
    """`first` and the requests after it, up to `max_pairs` pairs in all: every one already waiting (those that
    came while the last batch was scored), then any arriving within `max_wait_s`. Returns the batch, and the
    request that would have taken it over `max_pairs`, the next batch's first (a request of more pairs than
    that goes alone). A held request's wait starts again with its batch: at the default of no wait, nothing."""
    loop = asyncio.get_running_loop()
    batch, pairs, deadline = [first], len(first[0]), loop.time() + max_wait_s
    while pairs < max_pairs:
        if not queue.empty():
            request = queue.get_nowait()
        elif loop.time() < deadline:
            try:
                request = await asyncio.wait_for(queue.get(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
        else:
            break
        if pairs + len(request[0]) > max_pairs:
            return batch, request
        batch.append(request)
        pairs += len(request[0])
    return batch, None


def answer(batch: list[Request], scores: list[float] | Exception) -> None:
    """Each request's share of the batch's scores, in order, or the batch's error. A request whose caller has
    gone (its call cancelled) is passed over: the others are still answered, and the server goes on."""
    start = 0
    for prompts, _, future in batch:
        if not future.done():
            if isinstance(scores, Exception):
                future.set_exception(scores)
            else:
                future.set_result(scores[start : start + len(prompts)])
        start += len(prompts)


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
        device = None
        if source.folders:  # a function's server computes no tensors (see Reward)
            import torch

            torch.set_num_threads(max(1, params.threads))
            device = actor_device(params.gpus, "the reward server")
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
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((list(prompts), list(completions), future))
        return await future

    async def stats(self) -> dict[str, int]:
        return dict(self.served)

    async def _serve(self) -> None:
        held = None
        while True:
            first = held if held is not None else await self.queue.get()
            batch, held = await take_batch(
                self.queue, first, self.params.max_batch_size, self.params.max_wait_ms / 1000
            )
            prompts = [p for r in batch for p in r[0]]
            completions = [c for r in batch for c in r[1]]
            try:
                # In a thread: the event loop keeps taking requests while the model runs.
                scores = await asyncio.to_thread(self.reward, prompts, completions, self.params.max_batch_size)
            except Exception as error:  # one failed batch fails its requests, not the server
                answer(batch, error)
                continue
            answer(batch, scores)
            self.served["requests"] += len(batch)
            self.served["pairs"] += len(prompts)
            self.served["batches"] += 1
