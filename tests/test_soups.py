"""Rewarded soups (`warp-ray soup`): the built-in rewards that pull apart, the multi-objective
baseline's weighted reward, and a whole soup on a local Ray cluster with real learners and engines."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import ray
import torch

from tests.helpers import tiny_run_config
from warp_ray.checkpoint import load_model_weights
from warp_ray.merge import slerp_soup
from warp_ray.reward.server import RewardServer, RewardSource
from warp_ray.reward.weighted import WeightedReward
from warp_ray.soups import verdict
from warp_ray.soups.front import points
from warp_ray.soups.training import Run, train
from warp_ray.task.world import REWARDS, concision, positivity

PROMPT = "write about the garden in the morning :"
SHORT = "the bench is calm ."
LONG = "the bench is calm and lovely . i saw a bright flower by the warm tree . the path was dull ."


def test_positivity_and_concision_pull_in_opposite_directions():
    assert positivity(PROMPT, SHORT) == 1.0
    assert positivity(PROMPT, LONG) == 4.0 - 1.0  # calm, lovely, bright, warm; dull
    assert positivity(PROMPT, "lovely lovely lovely .") == 1.0  # distinct words count, repeats do not
    assert concision(PROMPT, SHORT) == pytest.approx(-1.0)
    assert concision(PROMPT, LONG) == pytest.approx(-0.2 * len(LONG.split()))
    assert concision(PROMPT, "the bench is") == pytest.approx(-0.6 - 2.0)  # unfinished
    assert concision(PROMPT, "") == -2.0
    # the longer, warmer text wins one and loses the other
    assert positivity(PROMPT, LONG) > positivity(PROMPT, SHORT) and concision(PROMPT, LONG) < concision(PROMPT, SHORT)
    assert set(REWARDS) == {"gold", "positivity", "concision"}


def test_the_baselines_reward_is_the_weighted_sum_of_the_reward_servers(ray_cluster):
    servers = [RewardServer.remote(RewardSource(function=f)) for f in (positivity, concision)]
    weighted = WeightedReward.remote(servers, (0.25, 0.75))
    texts = [SHORT, LONG, "the bench is"]
    got = ray.get(weighted.score.remote([PROMPT] * 3, texts))
    assert got == pytest.approx([0.25 * positivity(PROMPT, t) + 0.75 * concision(PROMPT, t) for t in texts])
    with pytest.raises(ray.exceptions.RayActorError, match="got 1 lambdas for 2 rewards"):
        ray.get(WeightedReward.remote(servers, (1.0,)).score.remote([PROMPT], [SHORT]))
    for server in servers:
        ray.kill(server)


def _point(kind, lambdas, warmth, brevity):
    """A front's point whose two prompts score warmth +- 0.1 and brevity +- 0.1."""
    return {
        "kind": kind,
        "lambdas": lambdas,
        "warmth": warmth,
        "brevity": brevity,
        "warmth_by_prompt": [warmth - 0.1, warmth + 0.1],
        "brevity_by_prompt": [brevity + 0.1, brevity - 0.1],
    }


def test_the_margin_takes_the_soups_best_point_for_the_baselines_lambda():
    front = [
        _point("sft", None, 0.0, -4.0),
        _point("soup", [1.0, 0.0], 3.0, -6.0),
        _point("soup", [0.5, 0.5], 1.5, -3.0),  # the best for lambda (0.5, 0.5): 0.5 * 1.5 - 0.5 * 3 = -0.75
        _point("soup", [0.0, 1.0], 0.0, -2.0),
        _point("baseline", [0.5, 0.5], 2.0, -3.0),  # -0.5
    ]
    got = verdict.margin(front, (0.5, 0.5), ["warmth", "brevity"])
    assert got["margin"] == pytest.approx(0.25) and got["best_soup_lambdas"] == [0.5, 0.5]
    assert got["gain"] == pytest.approx(-0.5 - (-2.0)) and got["same_lambda_margin"] == pytest.approx(0.25)
    assert got["se"] == pytest.approx(0.0, abs=1e-12)  # the two points' prompts differ alike
    front[2]["warmth_by_prompt"] = [1.0, 2.0]  # paired differences of 0.45 and 0.05: stdev 0.4 / sqrt 2, over sqrt 2
    assert verdict.margin(front, (0.5, 0.5), ["warmth", "brevity"])["se"] == pytest.approx(0.2)


@pytest.mark.parametrize(
    "margins, expected",
    [
        ([0.01, 0.02, 0.0], verdict.CLOSE),  # well under a tenth of the gain of 1
        ([0.5, 0.6, 0.55], verdict.NOT_CLOSE),  # half the gain, every seed
        ([-0.5, 0.5, 0.1], verdict.NOISE),  # the seeds disagree
    ],
)
def test_the_verdict_over_seeds_takes_their_spread(margins, expected):
    judged = verdict.judge([_margin(m, 0.001, 1.0) for m in margins])
    assert judged["verdict"] == expected
    half = math.sqrt(4.303**2 * statistics.variance(margins) / 3 + 1.96**2 * 0.001**2)
    assert judged["low"] == pytest.approx(statistics.mean(margins) - half)
    assert verdict.judge([_margin(0.0, 0.001, -0.2)])["verdict"] == verdict.NO_GAIN


def _margin(margin: float, se: float, gain: float) -> dict:
    return {"margin": margin, "se": se, "gain": gain, "best_soup_lambdas": [0.5, 0.5], "same_lambda_margin": margin}


@pytest.mark.slow
def test_a_soup_trains_a_policy_per_reward_and_evaluates_every_lambda_under_every_reward(
    ray_cluster, tiny_task: Path, tmp_path: Path
):
    from warp_ray.driver import run_soup

    config = tiny_run_config(
        tmp_path / "soup",
        {"sft_model": tiny_task / "sft", "prompts": tiny_task / "prompts"},
        rewards=[
            {"name": "warmth", "kind": "builtin", "path": "positivity"},
            {"name": "brevity", "kind": "builtin", "path": "concision"},
        ],
        soup={"grid": 2, "baseline_grid": 2, "runs_at_once": 3},
    )
    config.resources.cpus_per_rank = config.resources.cpus_per_rollout_worker = 0.3
    config.warp.lr = 1e-2  # policies far enough from the SFT to sample otherwise in 2 steps
    summary = run_soup(config)
    out = tmp_path / "soup"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["seeds"] == [0] and [j["lambdas"] for j in summary["by_lambda"]] == [[0.5, 0.5]]
    assert len(summary["by_lambda"][0]["margins"]) == 1 and summary["verdict"] in verdict.VERDICTS
    result = json.loads((out / "seed_0" / "front.json").read_text())
    assert result["rewards"] == ["warmth", "brevity"]
    kinds = [(p["kind"], p["lambdas"]) for p in result["points"]]
    assert kinds == [("sft", None), ("soup", [1.0, 0.0]), ("soup", [0.5, 0.5]), ("soup", [0.0, 1.0])] + [
        ("baseline", [0.5, 0.5])
    ]
    for point in result["points"]:  # every point under both rewards, with its noise, and its KL
        for key in ("warmth", "brevity", "kl_to_sft", "truncated"):
            assert math.isfinite(point[key]) and math.isfinite(point[f"{key}_se"]), (point, key)
    sft, *soup, baseline = result["points"]
    assert abs(sft["kl_to_sft"]) < 1e-3  # the engine held the SFT itself: its samples' log-probs are the reference's
    # each policy, and the baseline's, trained: moved from the SFT, and apart
    weights = {name: load_model_weights(Path(folder)) for name, folder in result["policies"].items()}
    assert set(weights) == {"warmth", "brevity", "lambda_0.5_0.5"}
    init = load_model_weights(tiny_task / "sft")
    name = "transformer.h.0.attn.c_attn.weight"
    assert not weights["warmth"][name].equal(init[name]) and not weights["warmth"][name].equal(weights["brevity"][name])
    assert not weights["lambda_0.5_0.5"][name].equal(init[name])
    # the points evaluated: the vertices are the policies exactly, the midpoint their average
    policies = {k: Path(result["policies"][k]) for k in ("warmth", "brevity")}
    served = dict((str(p["lambdas"]), w) for p, w in points(config, tiny_task / "sft", policies, {}))
    assert all(served["[1.0, 0.0]"][k].equal(weights["warmth"][k]) for k in init)
    assert all(served["[0.0, 1.0]"][k].equal(weights["brevity"][k]) for k in init)
    linear = served["[0.5, 0.5]"][name]
    torch.testing.assert_close(linear, (weights["warmth"][name] + weights["brevity"][name]) / 2)
    config.soup.interpolation = "slerp"  # of the task vectors from the SFT, lambda as SLERP's weights
    by_slerp = dict((str(p["lambdas"]), w) for p, w in points(config, tiny_task / "sft", policies, {}))["[0.5, 0.5]"]
    torch.testing.assert_close(
        by_slerp[name], slerp_soup(init, [weights["warmth"], weights["brevity"]], (0.5, 0.5))[name]
    )
    assert not torch.allclose(by_slerp[name], linear)  # SLERP keeps the task vectors' norm: another point
    # the engine sampled what it was handed (tests/test_rollout.py: the output layer of a tied model too)
    assert soup[0]["warmth_by_prompt"] != sft["warmth_by_prompt"] and soup[0]["kl_to_sft"] > 0.01
    assert (out / "front.png").stat().st_size > 10_000 and (out / "seed_0" / "front.png").stat().st_size > 10_000
    report = (out / "seed_0" / "report.md").read_text()
    assert "| soup | 0.5, 0.5 |" in report and "| baseline | 0.5, 0.5 |" in report
    over_seeds = (out / "report.md").read_text()
    assert f"| 0.5, 0.5 | {summary['by_lambda'][0]['margins'][0]:+.3f} |" in over_seeds
    assert f"| baseline | 0.5, 0.5 | {baseline['warmth']:.3f} | {baseline['brevity']:.3f} |" in over_seeds
    assert "With one seed the interval holds the held-out prompts' noise only" in over_seeds


@pytest.mark.slow
def test_a_soups_policy_can_be_a_warp_run_whose_last_iteration_is_the_policy(
    ray_cluster, tiny_task: Path, tmp_path: Path
):
    """soup.policy_run warp: the coordinator's Algorithm 1, against the reward server it is handed."""
    config = tiny_run_config(
        tmp_path / "soup",
        {"sft_model": tiny_task / "sft", "prompts": tiny_task / "prompts"},
        soup={"policy_run": "warp"},
    )
    config.warp.M, config.warp.T = 1, 1
    config.evaluation.front_etas, config.evaluation.front_towards = [1.0], ["init"]
    server = RewardServer.remote(RewardSource(function=positivity))
    trained = train(config, tiny_task / "sft", tiny_task / "prompts", [Run("warmth", server)], tmp_path / "runs")
    ray.kill(server)
    assert trained == {"warmth": tmp_path / "runs" / "warmth" / "iteration_0" / "model"}
    name = "transformer.h.0.attn.c_attn.weight"
    assert not load_model_weights(trained["warmth"])[name].equal(load_model_weights(tiny_task / "sft")[name])
    front = json.loads((tmp_path / "runs" / "warmth" / "iteration_0" / "front.json").read_text())
    assert [p["eta"] for p in front] == [1.0] and math.isfinite(front[0]["reward"])
