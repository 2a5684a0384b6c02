"""`warp-ray reproduce`'s checks and report, on results made up to hold or fail known claims.

The measurements themselves (runs.py) take about 20 minutes on 2 cores; they run as `make
reproduce`, not here. What they are made of runs in the other tests: the coordinator keeping
its policies (tests/test_coordinator.py), per-sample evaluation (tests/test_learner.py), the
accuracy table's flipped-pairs column (tests/test_warm.py).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from warp_ray.cli import main
from warp_ray.config import WarpConfig
from warp_ray.config_io import load_config
from warp_ray.errors import ConfigError, WarpRayError
from warp_ray.reproduce import claims, protocol, regime
from warp_ray.reproduce.claims import Check, Claim, collapse_step, front_gap, win_rate
from warp_ray.reproduce.protocol import seed_view
from warp_ray.reproduce.report import write_report
from warp_ray.reproduce.runs import BASELINES, SINGLE_RM_RUN, WARP_RUN, angles, check_protocol
from warp_ray.task import world

ROOT = Path(__file__).resolve().parents[1]


PROMPTS = 4  # held-out prompts of the made-up evaluations


def per_prompt(mean: float, spread: float = 0.001) -> list[float]:
    """PROMPTS per-prompt means averaging to `mean`."""
    return [mean + spread * (-1) ** k for k in range(PROMPTS)]


def point(kl: float, reward: float, **extra) -> dict:
    """A held-out evaluation whose prompts agree (almost no prompt noise)."""
    means = {"kl_to_sft": kl, "reward": reward, "control_reward": reward / 2}
    return {**means, **{f"{key}_by_prompt": per_prompt(value) for key, value in means.items()}, **extra}


def test_front_gap_compares_the_best_reward_within_each_kl_budget_both_fronts_reach():
    origin = point(0.0, 0.0)
    high, low = [point(1.0, 1.0), point(2.0, 2.0)], [point(1.0, 0.5), point(2.0, 1.5)]
    # budgets 0.02 .. 2.0: under 1 only the SFT is within reach (no gap), from 1 on a gap of 0.5, for 51 of 100 budgets
    assert front_gap(high, low, origin) == pytest.approx(0.255)
    assert front_gap(low, high, origin) == pytest.approx(-0.255)
    # beyond the other front's reach: ignored
    assert front_gap(high + [point(9.0, 99.0)], low, origin) == pytest.approx(0.255)
    # a worse point further in KL: dominated
    assert front_gap(high + [point(1.5, -9.0)], low, origin) == pytest.approx(0.255)


def test_win_rate_counts_ties_as_half_and_gives_its_standard_error():
    rate = win_rate([3, 2, 1, 5], [1, 2, 2, 4])
    assert (rate["wins"], rate["ties"], rate["losses"]) == (2, 1, 1)
    assert rate["rate"] == pytest.approx(2.5 / 4) and rate["se"] == pytest.approx(math.sqrt(0.625 * 0.375 / 4))


def test_collapse_is_the_first_fall_past_twice_the_noise_after_the_peak():
    run = [{"step": s, "control_reward": c} for s, c in ((20, 0.1), (40, 0.5), (60, 0.45), (80, 0.2), (100, 0.0))]
    assert collapse_step(run, noise=0.05) == 80  # 0.45 is within 2 x 0.05 of the peak, 0.2 is not
    assert collapse_step(run, noise=0.5) is None


def one_check(results: dict) -> list[Claim]:
    """A check_all of one claim whose one check is the mean reward of the evaluation "margin"."""
    return [Claim(1, "a claim", [Check("reward above zero", results["margin"]["reward"])])]


def seed_results(*margins: float, offsets: list[list[float]] | None = None) -> list[dict]:
    """One seed per margin; seed k's prompts deviate from its margin by offsets[k] (none: agree)."""
    offsets = offsets or [[0.0] * PROMPTS] * len(margins)
    return [
        {"margin": {**point(0.0, m), "reward_by_prompt": [m + d for d in offset]}}
        for m, offset in zip(margins, offsets)
    ]


def judged(seeds: list[dict]) -> protocol.Judged:
    (check,) = protocol.judge(one_check, seeds, 400, np.random.default_rng(0))[0].checks
    return check


def test_a_check_holds_when_its_interval_over_the_seeds_lies_above_zero():
    steady = judged(seed_results(1.0, 1.1, 0.9))  # prompts agree: the seeds' spread alone, t with 2 degrees of freedom
    assert steady.mean == pytest.approx(1.0) and steady.margins == pytest.approx([1.0, 1.1, 0.9])
    assert steady.high - steady.mean == pytest.approx(4.303 * 0.1 / math.sqrt(3)) and steady.status == protocol.HELD
    assert judged(seed_results(0.3, -0.1, 0.1)).status == protocol.NOISE
    assert judged(seed_results(-1.0, -1.1, -0.9)).status == protocol.FAILED


def test_the_prompts_all_seeds_share_add_their_noise_once():
    hard_prompts = [-1.0, -0.5, 0.5, 1.0]  # the same prompts are hard for every seed: a shared effect
    shared = judged(seed_results(0.2, 0.2, 0.2, offsets=[hard_prompts] * 3))
    se = np.std(hard_prompts) / math.sqrt(PROMPTS)  # the bootstrap's SE of a mean over 4 prompts
    assert shared.mean == pytest.approx(0.2) and shared.high - shared.mean == pytest.approx(1.96 * se, rel=0.15)
    assert shared.status == protocol.NOISE
    unmeasurable = judged(seed_results(0.5))  # one seed, and prompts that all agree: no noise estimate, no verdict
    assert math.isnan(unmeasurable.high) and unmeasurable.status == protocol.NOISE
    one_seed = judged(seed_results(0.2, offsets=[hard_prompts]))  # a quick look: one seed's resampled margin
    assert one_seed.high - one_seed.mean == pytest.approx(shared.high - shared.mean, rel=0.15)
    # Prompt noise of each seed's own, unrelated between seeds, is already in the seeds' spread: not counted again.
    own = [[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]]
    assert judged(seed_results(0.2, 0.2, 0.2, offsets=own)).high - 0.2 < 0.3 * (shared.high - shared.mean)


def test_a_check_not_observed_in_a_seed_or_in_many_prompt_resamples_is_not_held():
    def collapse(results: dict) -> list[Claim]:  # observed when the reward is above 0
        return [
            Claim(1, "", [Check("collapse", results["margin"]["reward"] if results["margin"]["reward"] > 0 else None)])
        ]

    (unseen,) = protocol.judge(collapse, seed_results(1.0, -1.0), 100, np.random.default_rng(0))
    assert unseen.checks[0].status == protocol.UNOBSERVED and unseen.checks[0].margins == [1.0, None]
    assert unseen.verdict == protocol.UNOBSERVED
    (fragile,) = protocol.judge(
        collapse, seed_results(0.5, offsets=[[2.0, 2.0, -3.0, -3.0]]), 400, np.random.default_rng(0)
    )
    assert fragile.checks[0].margins == [0.5] and 0.05 < fragile.checks[0].unobserved_share < 0.95
    assert fragile.checks[0].status == protocol.NOISE  # lost in many draws of the prompts


def test_every_evaluation_needs_its_per_prompt_means_over_the_same_prompts():
    results = {"runs": [point(1.0, 1.0), point(2.0, 2.0)]}
    assert protocol.prompt_count(results) == PROMPTS
    del results["runs"][1]["kl_to_sft_by_prompt"]
    with pytest.raises(WarpRayError, match=r"the evaluation at runs\[1\] has no kl_to_sft_by_prompt"):
        protocol.prompt_count(results)
    results["runs"][1] = {**point(2.0, 2.0), "reward_by_prompt": [2.0] * 5}
    with pytest.raises(WarpRayError, match=r"different numbers of held-out prompts: 4 at runs\[0\], 5 at runs\[1\]"):
        protocol.prompt_count(results)


def test_a_bootstrap_resample_recomputes_every_evaluation_from_the_drawn_prompts():
    results = {
        "runs": {"a": [{"step": 10, "reward": 2.0, "reward_by_prompt": [1.0, 2.0, 3.0], "reward_se": 0.5}]},
        "win_rate": {
            "warp": {
                "control_reward": 0.5,
                "control_reward_by_prompt": [0.0, 0.5, 1.0],
                "control_rewards": [0, 0, 0.5, 0.5, 1, 1],
            }
        },
        "angles": {"pairs": [[0, 1]]},
    }
    drawn = protocol.resample(results, np.array([2, 2, 0]))
    assert drawn["runs"]["a"][0]["reward"] == pytest.approx(7 / 3) and drawn["runs"]["a"][0]["step"] == 10
    assert drawn["win_rate"]["warp"]["control_rewards"] == [1, 1, 1, 1, 0, 0]  # the samples of the drawn prompts
    assert drawn["angles"] == results["angles"] and "reward_by_prompt" not in drawn["runs"]["a"][0]


def test_angles_of_task_vectors_and_cosines_of_weights_per_tensor():
    init = {"w": torch.full((4,), 10.0), "frozen": torch.ones(3), "step": torch.tensor([1])}
    along = {"w": init["w"] + torch.tensor([1.0, 0, 0, 0]), "frozen": init["frozen"], "step": init["step"]}
    across = {"w": init["w"] + torch.tensor([0, 2.0, 0, 0]), "frozen": init["frozen"], "step": init["step"]}
    same = {"w": init["w"] + torch.tensor([3.0, 0, 0, 0]), "frozen": init["frozen"], "step": init["step"]}
    result = angles(init, [along, across, same])
    assert result["pairs"] == [(0, 1), (0, 2), (1, 2)]
    assert list(result["tensors"]) == ["w"]  # unmoved and integer tensors have no angle
    w = result["tensors"]["w"]
    assert w["task_vector_degrees"] == pytest.approx([90.0, 0.0, 90.0], abs=1e-4)
    assert w["norm_ratio"] == pytest.approx([0.5, 1 / 3, 2 / 3])
    assert w["weight_cosine"][0] == pytest.approx(
        float(torch.nn.functional.cosine_similarity(along["w"], across["w"], dim=0))
    )
    assert 0.99 < w["weight_cosine"][0] < 1.0


def test_protocol_refuses_settings_the_claims_are_not_about():
    check_protocol(load_config(ROOT / "configs" / "reproduce.yaml"))
    with pytest.raises(ConfigError, match=r"warp.M = 4 .* got 2"):
        check_protocol(load_config(ROOT / "configs" / "tiny.yaml"))
    with pytest.raises(ConfigError, match="warp.I >= 2"):
        check_protocol(load_config(ROOT / "configs" / "reproduce.yaml", ["warp.I=1"]))
    with pytest.raises(ConfigError, match=r"evaluation.every = warp.T / 10 = 20 .* got 10"):
        check_protocol(load_config(ROOT / "configs" / "reproduce.yaml", ["warp.T=200", "evaluation.every=10"]))


def evaluation(kl: float, reward: float, control: list[float] | None = None, **extra) -> dict:
    """An evaluation with its per-sample control rewards, prompt after prompt."""
    control = control or [reward / 2] * 8
    by_prompt = np.asarray(control, dtype=float).reshape(PROMPTS, -1).mean(axis=1).tolist()
    return {
        **extra,
        "kl_to_sft": kl,
        "kl_to_sft_se": 0.01,
        "reward": reward,
        "reward_se": 0.01,
        "control_reward": sum(control) / len(control),
        "control_reward_se": 0.01,
        "control_rewards": control,
        "kl_to_sft_by_prompt": per_prompt(kl),
        "reward_by_prompt": per_prompt(reward),
        "control_reward_by_prompt": by_prompt,
    }


def made_up_results(seeds: tuple[int, ...] = (0, 1, 2)) -> dict:
    """Results in which every claim holds except claim 5 (the M = 2 front is the higher one), the
    same for every seed."""
    config = load_config(ROOT / "configs" / "reproduce.yaml", ["reproduce.bootstrap=100"]).model_dump(mode="json")
    etas = config["evaluation"]["front_etas"]

    def run(scale: float, kl_rate: float = 1.0) -> list[dict]:
        return [{"step": s, **point(kl_rate * s / 20, scale * math.sqrt(s / 20))} for s in range(20, 101, 20)]

    def front(scale: float, towards: str | None = None) -> list[dict]:
        return [
            {**({"towards": towards} if towards else {}), "eta": eta, **point(5 * eta, scale * math.sqrt(5 * eta))}
            for eta in etas
        ]

    runs = {
        WARP_RUN: run(1.0),
        "EMA anchor, beta 0.01": run(1.0),
        "SFT anchor, beta 0": run(0.5, kl_rate=4.0),
        "SFT anchor, beta 0.01": run(0.8),
        "SFT anchor, beta 0.1": run(0.8),
        "SFT anchor, beta 0.01, single RM": run(0.6),
    }
    runs["SFT anchor, beta 0.01, single RM"][-2:] = [
        {**p, "control_reward": 0.0, "control_reward_by_prompt": per_prompt(0.0)}
        for p in runs["SFT anchor, beta 0.01, single RM"][-2:]
    ]
    assert set(runs) == {WARP_RUN, SINGLE_RM_RUN, *BASELINES}
    accuracy = {
        name: {
            "train (as labelled)": 0.7,
            "train (true labels)": 0.7,
            "flipped pairs (as labelled)": flipped,
            "validation": 0.65,
            "ood": ood,
        }
        for name, flipped, ood in (("RM 1", 0.5, 0.6), ("ENS", 0.5, 0.6), ("WARM", 0.3, 0.7))
    }
    seed = {
        "seed": 0,
        "runs": runs,
        "warp": [
            {"front": front(1.5, "init") + front(1.5, "sft"), "trajectories": [run(1.0), run(0.9)]},
            {"front": front(1.5, "init") + front(2.0, "sft"), "trajectories": [run(1.0), run(0.9)]},
        ],
        "angles": {
            "pairs": [[0, 1]],
            "tensors": {"w": {"task_vector_degrees": [88.0], "norm_ratio": [1.0], "weight_cosine": [0.999]}},
        },
        "interpolation": {
            "lambda": [0.0, 0.25, 0.5, 0.75, 1.0],
            "slerp": [
                evaluation(4.0, 1.0),
                evaluation(4.2, 1.3),
                evaluation(4.4, 1.5),
                evaluation(4.2, 1.3),
                evaluation(4.0, 1.1),
            ],
            "lerp": [
                evaluation(4.0, 1.0),
                evaluation(3.2, 1.2),
                evaluation(3.0, 1.3),
                evaluation(3.2, 1.2),
                evaluation(4.0, 1.1),
            ],
        },
        "front_two_policies": [{"eta": eta, **evaluation(5 * eta, 3.0 * math.sqrt(5 * eta))} for eta in etas],
        "win_rate": {
            "warp": evaluation(3.0, 1.0, [1.0, 1.0, 1.0, 0.0] * 10, eta=0.5),  # WARP wins 3 samples in 4
            "reinforce": evaluation(3.1, 0.9, [0.0, 0.0, 0.0, 1.0] * 10),
        },
    }
    return {
        "seconds": {"task and WARM": 60.0, "seed 0": 600.0},
        "date": "2026-11-23",
        "config": config,
        "warm": {"accuracy": accuracy, "single_rm": "RM 1", "pairs": {"train": 1000, "validation": 300, "ood": 300}},
        "by_seed": [{**copy.deepcopy(seed), "seed": k} for k in seeds],
    }


def set_mean(evaluation: dict, key: str, value: float) -> None:
    evaluation[key], evaluation[f"{key}_by_prompt"] = value, per_prompt(value)


def verdicts(results: dict) -> dict[int, str]:
    views = [seed_view(results, k) for k in range(len(results["by_seed"]))]
    return {c.number: c.verdict for c in protocol.judge(claims.check_all, views, 100, np.random.default_rng(0))}


def test_claims_follow_the_numbers():
    results = made_up_results()
    assert verdicts(results) == {
        1: "held",
        2: "held",
        3: "held",
        4: "held",
        5: "did not hold",
        6: "held",
        7: "held",
        8: "held",
    }
    for seed in results["by_seed"]:
        set_mean(seed["win_rate"]["warp"], "kl_to_sft", 4.0)  # no longer matched in KL (REINFORCE: 3.1)
    results["by_seed"][1]["runs"]["SFT anchor, beta 0.01, single RM"] = results["by_seed"][1]["runs"][
        "SFT anchor, beta 0.01"
    ]
    found = verdicts(results)
    assert found[8] == "did not hold" and found[7] == "not observed"  # seed 1's single RM never collapsed
    for seed, gap in zip(results["by_seed"], (0.4, -0.3, 0.2)):  # SLERP above LERP at lambda 1/2 in two seeds of three
        set_mean(seed["interpolation"]["lerp"][2], "reward", seed["interpolation"]["slerp"][2]["reward"] - gap)
    assert verdicts(results)[2] == "within noise"


def test_report_has_each_claim_its_verdict_and_figure(tmp_path):
    report = write_report(made_up_results(), tmp_path)
    text = report.read_text()
    assert "| 5. More policies: merging M = 4 gives a better front than M = 2. | **did not hold** |" in text
    assert text.count("**held**") == 7
    for n in range(1, 9):
        assert f"## Claim {n}: " in text and f"![claim {n}](results/claim_{n}.png)" in text
        assert (tmp_path / "results" / f"claim_{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.count("| check | seed 0 | seed 1 | seed 2 | mean | 95% interval | status |") == 8
    assert "| win rate - 1/2 | +0.250 | +0.250 | +0.250 | +0.250 | [" in text and "ONE SEED" not in text
    quick = write_report(made_up_results(seeds=(7,)), tmp_path / "quick").read_text()
    assert "ONE SEED" in quick and "| check | seed 7 | mean | 95% interval | status |" in quick


def test_report_only_redraws_from_the_saved_results(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    args = [
        "reproduce",
        "--config",
        str(ROOT / "configs" / "reproduce.yaml"),
        "--set",
        f"paths.output_dir={out}",
        "--report-only",
    ]
    assert main(args) == 2
    assert "results.json does not exist" in capsys.readouterr().err
    (out / "reproduce").mkdir(parents=True)
    before_seeds = {key: value for key, value in made_up_results().items() if key != "by_seed"}
    (out / "reproduce" / "results.json").write_text(json.dumps({**before_seeds, **made_up_results()["by_seed"][0]}))
    assert main(args) == 2
    assert "was measured before the reproduction ran over seeds" in capsys.readouterr().err
    (out / "reproduce" / "results.json").write_text(json.dumps(made_up_results()))
    assert main(args + ["--report", str(tmp_path / "docs")]) == 0
    assert (tmp_path / "docs" / "results.md").is_file() and (tmp_path / "docs" / "results" / "claim_8.png").is_file()
    # before anything runs
    assert (
        main(
            [
                "reproduce",
                "--config",
                str(ROOT / "configs" / "reproduce.yaml"),
                "--set",
                f"paths.output_dir={out}",
                "--seeds",
                "4",
            ]
        )
        == 2
    )
    assert "--seeds 4: reproduce.seeds lists 3 ([0, 1, 2]); take 1 to 3 of them" in capsys.readouterr().err
    assert main(args + ["--seeds", "1"]) == 2
    assert "--report-only measures none" in capsys.readouterr().err
    # the data, beside
    assert json.loads((tmp_path / "docs" / "results" / "results.json").read_text()) == made_up_results()


def made_up_regime(rise: float = 1.0, fall: float = 0.6, T: int = 100, mu: float = 0.1) -> dict:
    """A regime run over T steps whose gold reward rises by `rise` by T/2, then falls by `fall` while KL grows."""

    def gold(step: int) -> float:
        return -1.0 + rise * min(step, T // 2) / (T // 2) - fall * max(0, step - T // 2) / (T // 2)

    run = [
        {"step": s, "kl_to_sft": 0.05 * s, "control_reward": gold(s), "control_reward_se": 0.1, "truncated": 0.0}
        for s in range(T // 10, T + 1, T // 10)
    ]
    return {
        "T": T,
        "mu": mu,
        "run": run,
        "best_gold_reward": 5.5,
        "label_ceiling": 0.78,
        "best_single_rm": {"name": "RM 2", "accuracy": 0.75},
        "rms": {"RM 2": 0.75},
        "sft": {"control_reward": -1.0, "control_reward_se": 0.1, "truncated": 0.02},
    }


def test_the_label_ceiling_is_the_gold_rewards_own_accuracy_ties_counting_half():
    pairs = [
        {"gold_chosen": 2.0, "gold_rejected": 1.0},
        {"gold_chosen": 0.0, "gold_rejected": 1.0},
        {"gold_chosen": 1.0, "gold_rejected": 1.0},
        {"gold_chosen": 3.0, "gold_rejected": -1.0},
    ]
    assert regime.label_ceiling(pairs) == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_regime_criteria_follow_the_numbers():
    holds = {c.name: c.holds for c in regime.criteria(made_up_regime())}
    assert all(h is not False for h in holds.values()), holds
    assert sum(h is None for h in holds.values()) == 1  # the room above the SFT is reported, not judged
    failing = made_up_regime(rise=0.2, fall=0.1, T=100, mu=0.01)  # rises by 2 SE, falls by 0.7 SE, 1/mu = T
    failing["sft"]["truncated"] = 0.3
    failing["label_ceiling"], failing["best_single_rm"]["accuracy"] = 0.7, 0.6
    assert [c.holds for c in regime.criteria(failing)] == [False, None, False, False, False, False, False, True]
    early = made_up_regime()
    for p in early["run"]:
        p["kl_to_sft"] = 5.0 if p["step"] >= 10 else 0.0  # all the KL in the first tenth
    assert not next(c for c in regime.criteria(early) if c.name.startswith("KL to the SFT")).holds


def test_the_report_opens_with_the_regime_when_it_was_measured(tmp_path):
    results = made_up_results()
    for k, seed in enumerate(results["by_seed"]):
        seed["regime"] = made_up_regime(fall=0.6 + 0.1 * k)
    text = write_report(results, tmp_path).read_text()
    assert "## The regime" in text and "| label ceiling (validation) | 0.780 | >= 0.75 | yes |" in text
    assert "| 2 | 1.000 | " in text and "| 0.800 | " in text  # seed 2's run: its rise, and its fall of 0.8
    assert text.index("## The regime") < text.index("| claim | verdict |")
    assert "## The regime" not in write_report(made_up_results(), tmp_path / "without").read_text()


def test_regime_only_runs_are_logged_and_the_report_tables_every_configuration_tried(tmp_path):
    import json

    from warp_ray.reproduce import REGIME_LOG, _log_regime, reproduce

    config = load_config(ROOT / "configs" / "reproduce.yaml", [f"paths.output_dir={tmp_path}/run"])
    slow = config.model_copy(update={"warp": config.warp.model_copy(update={"lr": config.warp.lr / 10})})
    _log_regime(tmp_path / "docs", config, made_up_regime())
    _log_regime(tmp_path / "docs", slow, made_up_regime(fall=0.0))
    quick = config.model_copy(update={"reproduce": config.reproduce.model_copy(update={"seeds": [0]})})
    _log_regime(tmp_path / "docs", quick, made_up_regime())  # the same regime measured again (a quick run's): once
    (tmp_path / "run" / "reproduce").mkdir(parents=True)
    (tmp_path / "run" / "reproduce" / "results.json").write_text(json.dumps(made_up_results()))
    text = reproduce(config, tmp_path / "docs", measure=False).read_text()
    date = json.loads((tmp_path / "docs" / REGIME_LOG).read_text().splitlines()[0])["date"]
    rows = [line for line in text.splitlines() if line.startswith(("| C0 |", "| C1 |")) and date in line]
    assert len(rows) == 2 and rows[0].endswith("| yes |") and rows[1].endswith("| no |")  # the second one never falls
    assert f"| {config.warp.lr} |" in rows[0] and f"| {config.warp.lr / 10} |" in rows[1]
    assert f"| {date} | {world.FINGERPRINT} |" in rows[0]  # the world, which no setting names
    assert "regime_tried" not in json.loads((tmp_path / "docs" / "results" / "results.json").read_text())


def test_warm_is_reused_only_when_trained_on_the_same_task_and_settings(tmp_path, monkeypatch):
    import json

    from warp_ray import driver
    from warp_ray.reproduce import runs

    (tmp_path / "task" / "sft").mkdir(parents=True)
    trained = []

    def task_inputs(config, **needed):
        (tmp_path / "task" / "task.json").write_text(json.dumps({"params": {"pairs": config.task.pairs}}))
        return tmp_path / "task" / "sft", tmp_path / "task" / "prompts", tmp_path / "task" / "preferences", []

    def train_warm(params, *args):  # stands in for the Ray Tune sweep: what matters here is whether it runs
        trained.append(params)
        if len(trained) == 3:
            raise RuntimeError("a trial failed")
        return []

    monkeypatch.setattr(runs, "task_inputs", task_inputs)
    monkeypatch.setattr(driver, "task_inputs", task_inputs)
    monkeypatch.setattr(driver, "preference_splits", lambda folder: {})
    monkeypatch.setattr(driver, "check_preferences", lambda *args: None)
    monkeypatch.setattr(driver, "init_ray", lambda **kwargs: None)
    monkeypatch.setattr(driver, "train_warm", train_warm)
    monkeypatch.setattr(
        driver,
        "accuracy_table",
        lambda folders, merged, splits, params, columns, trust: {"WARM": {"validation": len(trained)}},
    )

    def config(*overrides: str) -> WarpConfig:
        overrides = [f"paths.output_dir={tmp_path}/out", *overrides]
        return load_config(ROOT / "configs" / "reproduce.yaml", overrides)

    assert runs._task_and_warm(config())[3] == {"WARM": {"validation": 1}}
    assert runs._task_and_warm(config())[3:] == ({"WARM": {"validation": 1}}, False) and len(trained) == 1  # read back
    assert runs._task_and_warm(config("task.pairs=2000"))[3:] == ({"WARM": {"validation": 2}}, True)  # another task
    with pytest.raises(RuntimeError, match="a trial failed"):
        runs._task_and_warm(config("warm.steps=300"))  # other WARM settings: trained again, and failing half-way...
    runs._task_and_warm(config("task.pairs=2000"))
    assert len(trained) == 4  # ...leaves no record: the next run trains again


def test_an_undefined_standard_error_judges_nothing():
    assert math.isnan(regime._in_units(float("nan"), 0.0)) and math.isnan(regime._in_units(1.0, float("nan")))
    single_prompt = made_up_regime()
    single_prompt["sft"]["control_reward_se"] = float("nan")  # an evaluation of one prompt has no spread
    rise = next(c for c in regime.criteria(single_prompt) if "the rise" in c.name)
    assert rise.holds is False
    with pytest.raises(ConfigError, match="evaluation.prompts >= 2"):
        check_protocol(load_config(ROOT / "configs" / "reproduce.yaml", ["evaluation.prompts=1"]))


def test_seeds_share_the_task_and_the_reward_models_through_links(tmp_path):
    from warp_ray.reproduce.runs import seed_config

    config = load_config(ROOT / "configs" / "reproduce.yaml", [f"paths.output_dir={tmp_path}"])
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "task.json").write_text("{}")
    first, again = seed_config(config, 3), seed_config(config, 3)  # a resumed reproduction finds its links in place
    assert first == again and first.warp.seed == 3 and first.paths.output_dir == tmp_path / "seeds" / "seed_3"
    assert (first.paths.output_dir / "task" / "task.json").read_text() == "{}"
    # WARM, trained later, is found there
    assert (first.paths.output_dir / "rm").resolve() == (tmp_path / "rm").resolve()
    assert config.paths.output_dir == tmp_path and config.warp.seed == 0  # the shared config is untouched
    (tmp_path / "seeds" / "seed_4" / "task").mkdir(parents=True)  # a copy, not a link: it would go its own way
    with pytest.raises(WarpRayError, match=r"seed_4/task should link to the shared .*/task"):
        seed_config(config, 4)


def test_a_seed_is_read_back_only_when_measured_with_the_same_settings_and_reward_models(tmp_path, monkeypatch):
    import json

    from warp_ray.reproduce import runs

    measured = []

    def measure_seed(config):  # stands in for the seed's runs: what matters here is whether it runs
        measured.append(config.warp.seed)
        return {"seed": config.warp.seed, "n": len(measured), "seconds": {"WARP": 60.0}}

    monkeypatch.setattr(runs, "measure_seed", measure_seed)
    (tmp_path / "rm" / "warm").mkdir(parents=True)
    (tmp_path / "rm" / "warm" / "model.safetensors").write_bytes(b"the reward models of the time")
    config = load_config(ROOT / "configs" / "reproduce.yaml", [f"paths.output_dir={tmp_path}"])
    seeded = runs.seed_config(config, 2)
    assert runs._seed_results(seeded) == ({"seed": 2, "n": 1, "seconds": {"WARP": 60.0}}, True)
    assert runs._seed_results(runs.seed_config(config, 2))[1] is False and measured == [2]  # read back
    (seeded.paths.output_dir / "iteration_0").mkdir()  # WARP's, against the reward models of the time
    (tmp_path / "rm" / "warm" / "model.safetensors").write_bytes(b"trained again, with the same settings")
    assert runs._seed_results(seeded)[0]["n"] == 2
    assert not (seeded.paths.output_dir / "iteration_0").exists() and (seeded.paths.output_dir / "rm").is_symlink()
    samples = config.evaluation.model_copy(update={"samples_per_prompt": 2})
    assert runs._seed_results(runs.seed_config(config.model_copy(update={"evaluation": samples}), 2))[0]["n"] == 3
    assert json.loads((seeded.paths.output_dir / "results.json").read_text())["n"] == 3

    # A quick look, then the full run: each seed measured once; which seeds and how many resamples change nothing.
    quick = config.model_copy(
        update={"evaluation": samples, "reproduce": config.reproduce.model_copy(update={"seeds": [2]})}
    )
    measured.clear()
    assert runs._seed_results(runs.seed_config(quick, 2))[1] is False
    full = quick.model_copy(
        update={"reproduce": quick.reproduce.model_copy(update={"seeds": [2, 5], "bootstrap": 200})}
    )
    assert [runs._seed_results(runs.seed_config(full, seed))[1] for seed in (2, 5)] == [False, True] and measured == [5]
    monkeypatch.setattr(runs.world, "FINGERPRINT", "another world")  # a gold reward changed where no label did
    assert runs._seed_results(runs.seed_config(full, 2))[1] is True and measured == [5, 2]


@pytest.mark.slow
def test_a_quick_reproduction_measures_its_seed_and_reports_it(tmp_path, ray_cluster):
    """`warp-ray reproduce --seeds 1` for real, at toy sizes: the shared task and WARM, then one
    seed's WARP, regime run, baselines and merges; every evaluation keeps its per-prompt means."""
    import json

    out = tmp_path / "run"
    sizes = [
        "warp.T=10",
        "evaluation.every=1",
        "warp.batch_size=4",
        "warp.samples_per_prompt=2",
        "warp.max_new_tokens=16",
        "warm.steps=5",
        "warm.linear_probe_steps=5",
        "warm.M=2",
        "warm.cpus_per_trial=0.5",  # both fine-tunes at once on the 2 CPUs
        "task.corpus_size=300",
        "task.sft_steps=20",
        "task.pairs=48",
        "task.validation_pairs=24",
        "task.ood_pairs=24",
        "evaluation.prompts=4",
        "evaluation.samples_per_prompt=2",
        "evaluation.front_etas=[0.0, 0.5, 1.0]",
        "reproduce.seeds=[7, 3]",
        "reproduce.bootstrap=100",
        "resources.colocate=true",
        "resources.weight_sync=auto",
    ]
    args = ["reproduce", "--config", str(ROOT / "configs" / "reproduce.yaml"), "--set", f"paths.output_dir={out}"]
    for setting in sizes:
        args += ["--set", setting]
    assert main(args + ["--seeds", "1", "--report", str(tmp_path / "docs")]) == 0
    results = json.loads((out / "reproduce" / "results.json").read_text())
    (seed,) = results["by_seed"]
    assert seed["seed"] == 7 and list(results["seconds"]) == ["task and WARM", "seed 7"]
    assert set(seed["runs"]) == {WARP_RUN, SINGLE_RM_RUN, *BASELINES} and len(seed["warp"]) == 2
    # each baseline ran with its own anchor and beta, the second wave's on the first wave's learners
    logs, mu = out / "seeds" / "seed_7" / "reproduce" / "logs", results["config"]["warp"]["mu"]
    for name, variant in BASELINES.items():
        log = logs / name.replace(",", "").replace(" ", "_") / "metrics.jsonl"
        steps = [json.loads(line) for line in log.read_text().splitlines()]
        assert len(steps) == 10 and {(s["beta"], s["anchor_mu"]) for s in steps} == {
            (variant.beta, mu if variant.anchor == "ema" else 0.0)
        }, name
    points = [
        *seed["runs"][WARP_RUN],
        *seed["warp"][1]["front"],
        *seed["interpolation"]["slerp"],
        seed["win_rate"]["warp"],
    ]
    for p in points:
        assert len(p["reward_by_prompt"]) == len(p["control_reward_by_prompt"]) == 4
        assert np.mean(p["kl_to_sft_by_prompt"]) == pytest.approx(p["kl_to_sft"])
    assert len(seed["win_rate"]["warp"]["control_rewards"]) == 4 * 2
    assert (out / "seeds" / "seed_7" / "iteration_1" / "front.json").is_file() and not (
        out / "seeds" / "seed_3"
    ).exists()
    assert (out / "seeds" / "seed_7" / "rm").is_symlink() and len(
        list((out / "rm").glob("rm_*"))
    ) == 2  # WARM trained once
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "ONE SEED" in text and text.count("| check | seed 7 | mean | 95% interval | status |") == 8
