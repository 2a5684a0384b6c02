"""The reward-server actor on a real local Ray cluster: batching, concurrency, bad requests, replicas."""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from warp_ray.config import RewardServerParams
from warp_ray.data import read_preferences
from warp_ray.reward.model import load_reward_model, score
from warp_ray.reward.server import RewardServer, RewardSource, answer, start_reward_server, take_batch
from warp_ray.task import world

MODEL_CODE = ("torch", "transformers", "warp_ray.reward.model")


@pytest.fixture(scope="module")
def rm_folders(tiny_task, tmp_path_factory):
    """Two reward models on the task's SFT backbone (fresh heads, different seeds)."""
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, tokenizer = load_reward_model(tiny_task / "sft")
        folder = tmp_path_factory.mktemp(f"rm{seed}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def pairs(tiny_task):
    return read_preferences(tiny_task / "preferences" / "validation.jsonl")[:80]


@pytest.fixture(scope="module")
def shared_server(ray_cluster, rm_folders):
    """One server for the bad requests, each followed by a good one: it goes on after every one of them."""
    server = RewardServer.remote(RewardSource(folders=(str(rm_folders[0]),)))
    yield server
    ray.kill(server)


def direct(folder, prompts, completions):
    return score(*load_reward_model(folder), prompts, completions)


def test_concurrent_callers_get_the_scores_of_a_direct_call(ray_cluster, rm_folders, pairs):
    server = RewardServer.remote(
        RewardSource(folders=(str(rm_folders[0]),)), RewardServerParams(max_batch_size=64, max_wait_ms=50)
    )
    requests = [pairs[i * 10 : (i + 1) * 10] for i in range(8)]  # 8 learners at once
    refs = [server.score.remote([p["prompt"] for p in r], [p["chosen"] for p in r]) for r in requests]
    answers = ray.get(refs)
    expected = direct(rm_folders[0], [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    assert torch.allclose(torch.tensor([s for a in answers for s in a]), expected, atol=1e-5)
    stats = ray.get(server.stats.remote())
    assert stats["requests"] == 8 and stats["pairs"] == 80
    assert stats["batches"] < 8  # requests were served together


def queued(sizes: list[int]) -> tuple[asyncio.Queue, list]:
    """A queue holding requests of these many pairs, as `RewardServer.score` puts them."""
    queue, requests = asyncio.Queue(), []
    for n in sizes:
        requests.append(([f"p{i}" for i in range(n)], [f"c{i}" for i in range(n)], asyncio.Future()))
        queue.put_nowait(requests[-1])
    return queue, requests


def test_a_batch_takes_the_waiting_requests_without_waiting_up_to_its_size():
    async def take(queue, first, max_pairs, max_wait_s):
        return await asyncio.wait_for(take_batch(queue, first, max_pairs, max_wait_s), 10)  # a hang fails

    async def scenario():
        # waiting requests that fill the batch: taken at once, however long the wait could be
        queue, requests = queued([4] * 8)
        start = time.perf_counter()
        batch, held = await take(queue, queue.get_nowait(), max_pairs=32, max_wait_s=5.0)
        assert batch == requests and held is None and time.perf_counter() - start < 1.0
        # and without a wait: every request waiting joins (an await of each, timed out at 0, would take none)
        queue, requests = queued([4] * 8)
        assert await take(queue, queue.get_nowait(), max_pairs=64, max_wait_s=0.0) == (requests, None)
        # 10 pairs at most: the third request would go over, and is the next batch's first
        queue, requests = queued([4, 4, 4, 4])
        batch, held = await take(queue, queue.get_nowait(), max_pairs=10, max_wait_s=0.0)
        assert batch == requests[:2] and held is requests[2] and queue.qsize() == 1
        # a request over the size alone
        queue, requests = queued([20, 1])
        assert await take(queue, queue.get_nowait(), max_pairs=10, max_wait_s=0.0) == ([requests[0]], None)
        # a wait: a request arriving within it joins, the batch ends at its deadline
        queue, (first, arriving) = asyncio.Queue(), queued([1, 1])[1]
        asyncio.get_running_loop().call_later(0.05, queue.put_nowait, arriving)
        start = time.perf_counter()
        batch, held = await take(queue, first, max_pairs=64, max_wait_s=0.3)
        assert batch == [first, arriving] and held is None and time.perf_counter() - start >= 0.3

    asyncio.run(scenario())


def test_a_request_whose_caller_is_gone_is_passed_over_and_the_others_answered():
    async def scenario():
        _, requests = queued([2, 3, 1])
        requests[1][2].cancel()  # its call cancelled while the batch was scored
        answer(requests, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
        assert requests[0][2].result() == [0.0, 1.0] and requests[2][2].result() == [5.0]
        _, requests = queued([1, 1])
        requests[0][2].cancel()
        answer(requests, ValueError("the model failed"))
        with pytest.raises(ValueError, match="the model failed"):
            requests[1][2].result()

    asyncio.run(scenario())


def test_requests_queued_while_a_batch_is_scored_are_served_together(ray_cluster, tmp_path):
    """Without a wait (max_wait_ms 0), the requests that came while a batch was scored form the next
    batch, not one batch each. The reward waits for a gate that the test opens once they are queued."""
    scoring, gate = tmp_path / "scoring", tmp_path / "open"

    def gated_length(prompt: str, completion: str) -> float:
        scoring.touch()
        while not gate.exists():
            time.sleep(0.01)
        return float(len(completion))

    def until(condition) -> None:
        deadline = time.monotonic() + 60
        while not ray.get(server.__ray_call__.remote(condition)):
            assert time.monotonic() < deadline, "the server never got there"
            time.sleep(0.01)

    server = RewardServer.remote(RewardSource(function=gated_length), RewardServerParams(max_wait_ms=0))
    first = server.score.remote(["a prompt"], ["first"])
    try:
        until(lambda _: scoring.exists())  # the first request's batch is being scored
        requests = [[f"learner {i}"] * (i + 1) for i in range(7)]
        answers = [server.score.remote(["a prompt"] * len(r), r) for r in requests]
        until(lambda s: s.queue.qsize() == 7)
    finally:
        gate.touch()
    assert ray.get(first) == [5.0] and ray.get(answers) == [[float(len(c)) for c in r] for r in requests]
    stats = ray.get(server.stats.remote())
    assert stats["requests"] == 8 and stats["batches"] == 2, stats


def test_requests_arriving_while_a_batch_is_scored(ray_cluster, rm_folders, pairs):
    """Learners that keep calling: requests are checked while earlier ones are being scored."""
    server = RewardServer.remote(
        RewardSource(folders=(str(rm_folders[0]),)), RewardServerParams(max_batch_size=64, max_wait_ms=1)
    )
    expected = direct(rm_folders[0], [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])

    def learner(offset: int) -> list[tuple[int, float]]:
        got = []
        for start in range(offset, offset + 3 * len(pairs), len(pairs) // 4):  # 12 requests of 20 pairs
            indices = [(start + i) % len(pairs) for i in range(20)]
            scores = ray.get(
                server.score.remote([pairs[i]["prompt"] for i in indices], [pairs[i]["chosen"] for i in indices])
            )
            got += list(zip(indices, scores))
        return got

    with ThreadPoolExecutor(4) as pool:
        results = [pair for got in pool.map(learner, range(0, 80, 20)) for pair in got]
    assert len(results) == 4 * 12 * 20  # every pair of every request answered, once
    for i, value in results:
        assert value == pytest.approx(expected[i].item(), abs=1e-5)


def test_ens_and_gold_rewards(ray_cluster, rm_folders, pairs):
    prompts, completions = [p["prompt"] for p in pairs], [p["rejected"] for p in pairs]
    ens = RewardServer.remote(RewardSource(folders=tuple(str(f) for f in rm_folders)))
    expected = (direct(rm_folders[0], prompts, completions) + direct(rm_folders[1], prompts, completions)) / 2
    assert torch.allclose(torch.tensor(ray.get(ens.score.remote(prompts, completions))), expected, atol=1e-5)
    gold = RewardServer.remote(RewardSource(function=world.gold_reward))
    assert ray.get(gold.score.remote(prompts, completions)) == [
        world.gold_reward(p, c) for p, c in zip(prompts, completions)
    ]
    # a function's server (every evaluator on the built-in task starts one) imports no model code, nor torch
    imported = ray.get(gold.__ray_call__.remote(lambda server: [m for m in sys.modules if m.startswith(MODEL_CODE)]))
    assert imported == []


@pytest.mark.parametrize(
    "prompts, completions, message",
    [
        ([], [], "at least one (prompt, completion) pair"),
        (["a", "b"], ["c"], "got 2 prompts but 1 completions"),
        (["a"], [3], "pair 0: the completion must be a string, got int"),
        (
            [[{"role": "user"}]],
            ["c"],
            "pair 0: the prompt: message 0 must be an object with string 'role' and 'content'",
        ),
        (["write about the garden :"], ["the flower is old . " * 40], "pair 0 is"),
    ],
)
def test_bad_requests_get_a_clear_error_and_the_server_goes_on(shared_server, prompts, completions, message):
    with pytest.raises(ray.exceptions.RayTaskError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ray.get(shared_server.score.remote(prompts, completions))
    assert len(ray.get(shared_server.score.remote(["write about the garden :"], ["the bee is warm ."]))) == 1


def test_replicas_answer_as_one_server_share_the_load_and_retry_a_killed_ones_requests(ray_cluster, rm_folders, pairs):
    # Batches wait 2 s to fill, so that the kill below finds requests waiting in the replica.
    params = RewardServerParams(max_wait_ms=2000, replicas=2)
    replicas = start_reward_server(RewardSource(folders=(str(rm_folders[0]),)), params)
    servers = ray.get(replicas.handles.remote())
    expected = direct(rm_folders[0], [p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    requests = [pairs[i * 10 : (i + 1) * 10] for i in range(8)]  # 8 learners at once

    def score_all() -> list:
        return [replicas.score.remote([p["prompt"] for p in r], [p["chosen"] for p in r]) for r in requests]

    assert torch.allclose(torch.tensor([s for a in ray.get(score_all()) for s in a]), expected, atol=1e-5)
    assert ray.get(replicas.load.remote())["served"] == [4, 4]  # each request to the one with fewer in flight

    refs = score_all()
    while ray.get(replicas.load.remote())["in_flight"] != [4, 4]:
        time.sleep(0.05)
    ray.kill(servers[0], no_restart=False)  # its process dies, 4 requests waiting in it; Ray starts it again
    assert torch.allclose(torch.tensor([s for a in ray.get(refs) for s in a]), expected, atol=1e-5)
    load = ray.get(replicas.load.remote())
    assert load["served"] == [4, 12]  # the killed one's 4 answered by the other
    deadline = time.time() + 60
    while load["down"][0] and time.time() < deadline:  # until Ray has restarted it and it answers
        time.sleep(0.5)
        load = ray.get(replicas.load.remote())
    assert load["down"] == [False, False]

    refs = score_all()
    while ray.get(replicas.load.remote())["in_flight"] != [4, 4]:
        time.sleep(0.05)
    for server in servers:  # both at once: the requests wait for the first back, as on a single server
        ray.kill(server, no_restart=False)
    assert torch.allclose(torch.tensor([s for a in ray.get(refs) for s in a]), expected, atol=1e-5)
    assert sum(ray.get(replicas.load.remote())["served"]) == 24
    ray.kill(replicas)  # and its replicas with it
