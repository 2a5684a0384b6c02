"""Replicas of a service actor behind one handle: the reward server's (`reward_server.replicas`)
and the SFT reference's (`evaluation.reference_replicas`), so that M learners do not queue on one model.

`Replicas` is an async actor that callers use as they would the service itself (`score`,
`sequence_logprobs`). It counts the requests in flight at each replica, every caller's, and
sends each new one to the replica with the fewest. A replica that dies fails its requests at
once (it is started with no task retries); they go to another, and the dead one takes no
request until Ray has restarted it (`warp_ray.runtime.SERVICE`) and it answers again. While
every replica is restarting, requests wait for the first back, as they would on a single
server. One whose restarts are spent is left out for good, and said so in the logs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

import ray

log = logging.getLogger(__name__)

REPLICA = {"max_task_retries": 0}
"""Ray options of a replica behind `Replicas`: a call to a dead replica fails, to be retried on another."""


def start_replicas(start: Callable[..., Any], count: int):
    """The service actor `start(**ray_options)` starts: once (its own handle), or `count` times behind `Replicas`."""
    return start() if count == 1 else Replicas.remote(start, count)


@ray.remote(max_restarts=3, max_task_retries=-1)
class Replicas:
    def __init__(self, start: Callable[..., Any], count: int):
        # Started here, so that they are this actor's: they end with it, and a restarted router starts new ones.
        self.replicas = [start(**REPLICA) for _ in range(count)]
        self.in_flight = [0] * count
        self.served = [0] * count
        self.restarting: dict[int, asyncio.Task] = {}  # replica -> the task that takes it back
        self.gone: set[int] = set()  # restarts spent

    async def _route(self, method: str, *args) -> Any:
        failed: set[int] = set()  # replicas that failed this request since it last waited
        while True:
            out = failed | self.restarting.keys() | self.gone
            up = [i for i in range(len(self.replicas)) if i not in out]
            if not up:
                if not self.restarting:
                    raise RuntimeError(f"every replica failed {method}: {len(self.gone)} are gone for good")
                log.warning(
                    "every replica of %d is restarting: %s waits for the first back", len(self.replicas), method
                )
                await asyncio.wait(list(self.restarting.values()), return_when=asyncio.FIRST_COMPLETED)
                failed.clear()
                continue
            i = min(up, key=self.in_flight.__getitem__)
            self.in_flight[i] += 1
            try:
                answer = await getattr(self.replicas[i], method).remote(*args)
            except ray.exceptions.RayActorError:
                failed.add(i)
                if i not in self.restarting and i not in self.gone:
                    self.restarting[i] = asyncio.get_running_loop().create_task(self._back_up(i))
                continue
            finally:
                self.in_flight[i] -= 1
            self.served[i] += 1
            return answer

    async def _back_up(self, i: int) -> None:
        """Take replica i back once Ray has restarted it; leave it out if it will not come back."""
        try:
            while True:
                try:
                    await self.replicas[i].__ray_ready__.remote()
                    return
                except ray.exceptions.ActorUnavailableError:  # restarting
                    await asyncio.sleep(1)
                except ray.exceptions.RayActorError as error:
                    log.warning(
                        "replica %d of %d is gone for good (%s); serving on the others", i, len(self.replicas), error
                    )
                    self.gone.add(i)
                    return
        finally:
            del self.restarting[i]

    async def score(self, prompts: list, completions: list[str]) -> list[float]:
        """`RewardServer.score` on the least-loaded replica."""
        return await self._route("score", prompts, completions)

    async def sequence_logprobs(self, sequences: list, temperature: float = 1.0) -> list[float]:
        """`ReferencePolicy.sequence_logprobs` on the least-loaded replica."""
        return await self._route("sequence_logprobs", sequences, temperature)

    async def load(self) -> dict[str, list]:
        """Per replica, in order: requests in flight, requests answered, and whether it is down."""
        n = len(self.replicas)
        return {
            "in_flight": list(self.in_flight),
            "served": list(self.served),
            "down": [i in self.restarting or i in self.gone for i in range(n)],
        }

    async def handles(self) -> list:
        """The replicas' own actor handles, in replica order: to ask one for its stats, or to stop it."""
        return list(self.replicas)
