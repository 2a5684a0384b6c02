"""`warp-ray reproduce`'s checks and report, on results made up to hold or fail known claims.

The measurements themselves (runs.py) take about 20 minutes on 2 cores; they run as `make
reproduce`, not here. What they are made of runs in the other tests: the coordinator keeping
its policies (tests/test_coordinator.py), per-sample evaluation (tests/test_learner.py), the
accuracy table's flipped-pairs column (tests/test_warm.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from warp_ray.cli import main
from warp_ray.config import WarpConfig
from warp_ray.errors import ConfigError
from warp_ray.reproduce import claims, regime
from warp_ray.reproduce.claims import Check, collapse_step, front_gap, win_rate
from warp_ray.reproduce.report import write_report
from warp_ray.reproduce.runs import BASELINES, SINGLE_RM_RUN, WARP_RUN, angles, check_protocol

ROOT = Path(__file__).resolve().parents[1]


def point(kl: float, reward: float, **extra) -> dict:
    return {"kl_to_sft": kl, "reward": reward, "control_reward": reward / 2, **extra}


def test_front_gap_compares_the_best_reward_within_each_kl_budget_both_fronts_reach():
    origin = point(0.0, 0.0)
    high, low = [point(1.0, 1.0), point(2.0, 2.0)], [point(1.0, 0.5), point(2.0, 1.5)]
    # budgets 0.02 .. 2.0: under 1 only the SFT is within reach (no gap), from 1 on a gap of 0.5, for 51 of 100 budgets
    assert front_gap(high, low, origin) == pytest.approx(0.255)
    assert front_gap(low, high, origin) == pytest.approx(-0.255)
    assert front_gap(high + [point(9.0, 99.0)], low, origin) == pytest.approx(0.255)  # beyond the other front's reach: ignored
    assert front_gap(high + [point(1.5, -9.0)], low, origin) == pytest.approx(0.255)  # a worse point further in KL: dominated


def test_win_rate_counts_ties_as_half_and_gives_its_standard_error():
    rate = win_rate([3, 2, 1, 5], [1, 2, 2, 4])
    assert (rate["wins"], rate["ties"], rate["losses"]) == (2, 1, 1)
    assert rate["rate"] == pytest.approx(2.5 / 4) and rate["se"] == pytest.approx(math.sqrt(0.625 * 0.375 / 4))


def test_collapse_is_the_first_fall_past_twice_the_noise_after_the_peak():
    run = [{"step": s, "control_reward": c} for s, c in ((20, 0.1), (40, 0.5), (60, 0.45), (80, 0.2), (100, 0.0))]
    assert collapse_step(run, noise=0.05) == 80  # 0.45 is within 2 x 0.05 of the peak, 0.2 is not
    assert collapse_step(run, noise=0.5) is None


def test_a_check_holds_beyond_twice_its_noise():
    assert Check("", 0.3, 0.1).status == claims.HELD
    assert Check("", 0.1, 0.1).status == Check("", -0.1, 0.1).status == claims.NOISE
    assert Check("", -0.3, 0.1).status == claims.FAILED
    assert Check("", None).status == claims.UNOBSERVED


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
    assert w["weight_cosine"][0] == pytest.approx(float(torch.nn.functional.cosine_similarity(along["w"], across["w"], dim=0)))
    assert 0.99 < w["weight_cosine"][0] < 1.0


def test_protocol_refuses_settings_the_claims_are_not_about():
    check_protocol(WarpConfig.from_yaml(ROOT / "configs" / "reproduce.yaml"))
    with pytest.raises(ConfigError, match=r"warp.M = 4 .* got 2"):
        check_protocol(WarpConfig.from_yaml(ROOT / "configs" / "tiny.yaml"))
    with pytest.raises(ConfigError, match="warp.I >= 2"):
        check_protocol(WarpConfig.from_yaml(ROOT / "configs" / "reproduce.yaml", ["warp.I=1"]))
    with pytest.raises(ConfigError, match=r"evaluation.every = warp.T / 10 = 20 .* got 10"):
        check_protocol(WarpConfig.from_yaml(ROOT / "configs" / "reproduce.yaml", ["warp.T=200", "evaluation.every=10"]))


def evaluation(kl: float, reward: float, control: list[float] | None = None, **extra) -> dict:
    control = control or [reward / 2] * 8
    return {**extra, "kl_to_sft": kl, "kl_to_sft_se": 0.01, "reward": reward, "reward_se": 0.01, "control_reward": sum(control) / len(control),
            "control_reward_se": 0.01, "control_rewards": control}


def made_up_results() -> dict:
    """Results in which every claim holds except claim 5 (the M = 2 front is the higher one)."""
    config = WarpConfig.from_yaml(ROOT / "configs" / "reproduce.yaml").model_dump(mode="json")
    etas = config["evaluation"]["front_etas"]

    def run(scale: float, kl_rate: float = 1.0) -> list[dict]:
        return [{"step": s, **point(kl_rate * s / 20, scale * math.sqrt(s / 20))} for s in range(20, 101, 20)]

    def front(scale: float, towards: str | None = None) -> list[dict]:
        return [{**({"towards": towards} if towards else {}), "eta": eta, **point(5 * eta, scale * math.sqrt(5 * eta))} for eta in etas]

    runs = {WARP_RUN: run(1.0), "EMA anchor, beta 0.01": run(1.0), "SFT anchor, beta 0": run(0.5, kl_rate=4.0),
            "SFT anchor, beta 0.01": run(0.8), "SFT anchor, beta 0.1": run(0.8), "SFT anchor, beta 0.01, single RM": run(0.6)}
    runs["SFT anchor, beta 0.01, single RM"][-2:] = [{**p, "control_reward": 0.0} for p in runs["SFT anchor, beta 0.01, single RM"][-2:]]
    assert set(runs) == {WARP_RUN, SINGLE_RM_RUN, *BASELINES}
    accuracy = {name: {"train (as labelled)": 0.7, "train (true labels)": 0.7, "flipped pairs (as labelled)": flipped,
                       "validation": 0.65, "ood": ood} for name, flipped, ood in (("RM 1", 0.5, 0.6), ("ENS", 0.5, 0.6), ("WARM", 0.3, 0.7))}
    return {
        "seconds": {"task and WARM": 60.0, "WARP": 600.0}, "date": "2026-11-23", "config": config,
        "warm": {"accuracy": accuracy, "single_rm": "RM 1", "pairs": {"train": 1000, "validation": 300, "ood": 300}},
        "runs": runs,
        "warp": [{"front": front(1.5, "init") + front(1.5, "sft"), "trajectories": [run(1.0), run(0.9)]},
                 {"front": front(1.5, "init") + front(2.0, "sft"), "trajectories": [run(1.0), run(0.9)]}],
        "angles": {"pairs": [[0, 1]], "tensors": {"w": {"task_vector_degrees": [88.0], "norm_ratio": [1.0], "weight_cosine": [0.999]}}},
        "interpolation": {"lambda": [0.0, 0.25, 0.5, 0.75, 1.0],
                          "slerp": [evaluation(4.0, 1.0), evaluation(4.2, 1.3), evaluation(4.4, 1.5), evaluation(4.2, 1.3), evaluation(4.0, 1.1)],
                          "lerp": [evaluation(4.0, 1.0), evaluation(3.2, 1.2), evaluation(3.0, 1.3), evaluation(3.2, 1.2), evaluation(4.0, 1.1)]},
        "front_two_policies": [{"eta": eta, **evaluation(5 * eta, 3.0 * math.sqrt(5 * eta))} for eta in etas],
        "win_rate": {"warp": evaluation(3.0, 1.0, [1.0] * 30 + [0.0] * 10, eta=0.5),
                     "reinforce": evaluation(3.1, 0.9, [0.0] * 30 + [1.0] * 10)},
    }


def test_claims_follow_the_numbers():
    results = made_up_results()
    verdicts = {c.number: c.verdict for c in claims.check_all(results)}
    assert verdicts == {1: "held", 2: "held", 3: "held", 4: "held", 5: "did not hold", 6: "held", 7: "held", 8: "held"}
    results["win_rate"]["warp"]["kl_to_sft"] = 4.0  # no longer matched in KL (REINFORCE: 3.1)
    results["runs"]["SFT anchor, beta 0.01, single RM"] = results["runs"]["SFT anchor, beta 0.01"]  # no collapse either
    verdicts = {c.number: c.verdict for c in claims.check_all(results)}
    assert verdicts[8] == "did not hold" and verdicts[7] == "not observed"


def test_report_has_each_claim_its_verdict_and_figure(tmp_path):
    report = write_report(made_up_results(), tmp_path)
    text = report.read_text()
    assert "| 5. More policies: merging M = 4 gives a better front than M = 2. | **did not hold** |" in text
    assert text.count("**held**") == 7
    for n in range(1, 9):
        assert f"## Claim {n}: " in text and f"![claim {n}](results/claim_{n}.png)" in text
        assert (tmp_path / "results" / f"claim_{n}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_only_redraws_from_the_saved_results(tmp_path, capsys):
    import json

    out = tmp_path / "run"
    args = ["reproduce", "--config", str(ROOT / "configs" / "reproduce.yaml"), "--set", f"paths.output_dir={out}", "--report-only"]
    assert main(args) == 2
    assert "results.json does not exist" in capsys.readouterr().err
    (out / "reproduce").mkdir(parents=True)
    (out / "reproduce" / "results.json").write_text(json.dumps(made_up_results()))
    assert main(args + ["--report", str(tmp_path / "docs")]) == 0
    assert (tmp_path / "docs" / "results.md").is_file() and (tmp_path / "docs" / "results" / "claim_8.png").is_file()
    assert json.loads((tmp_path / "docs" / "results" / "results.json").read_text()) == made_up_results()  # the data, beside


def made_up_regime(rise: float = 1.0, fall: float = 0.6, T: int = 100, mu: float = 0.1) -> dict:
    """A regime run over T steps whose gold reward rises by `rise` by T/2, then falls by `fall` while KL grows."""
    def gold(step: int) -> float:
        return -1.0 + rise * min(step, T // 2) / (T // 2) - fall * max(0, step - T // 2) / (T // 2)

    run = [{"step": s, "kl_to_sft": 0.05 * s, "control_reward": gold(s), "control_reward_se": 0.1, "truncated": 0.0}
           for s in range(T // 10, T + 1, T // 10)]
    return {"T": T, "mu": mu, "run": run, "best_gold_reward": 5.5, "label_ceiling": 0.78,
            "best_single_rm": {"name": "RM 2", "accuracy": 0.75}, "rms": {"RM 2": 0.75},
            "sft": {"control_reward": -1.0, "control_reward_se": 0.1, "truncated": 0.02}}


def test_the_label_ceiling_is_the_gold_rewards_own_accuracy_ties_counting_half():
    pairs = [{"gold_chosen": 2.0, "gold_rejected": 1.0}, {"gold_chosen": 0.0, "gold_rejected": 1.0},
             {"gold_chosen": 1.0, "gold_rejected": 1.0}, {"gold_chosen": 3.0, "gold_rejected": -1.0}]
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
    results = {**made_up_results(), "regime": made_up_regime()}
    text = write_report(results, tmp_path).read_text()
    assert "## The regime" in text and "| label ceiling (validation) | 0.780 | >= 0.75 | yes |" in text
    assert text.index("## The regime") < text.index("| claim | verdict |")
    assert "## The regime" not in write_report(made_up_results(), tmp_path / "without").read_text()


def test_regime_only_runs_are_logged_and_the_report_tables_every_configuration_tried(tmp_path):
    import json

    from warp_ray.reproduce import REGIME_LOG, _log_regime, reproduce

    config = WarpConfig.from_yaml(ROOT / "configs" / "reproduce.yaml", [f"paths.output_dir={tmp_path}/run"])
    slow = config.model_copy(update={"warp": config.warp.model_copy(update={"lr": config.warp.lr / 10})})
    _log_regime(tmp_path / "docs", config, made_up_regime())
    _log_regime(tmp_path / "docs", slow, made_up_regime(fall=0.0))
    (tmp_path / "run" / "reproduce").mkdir(parents=True)
    (tmp_path / "run" / "reproduce" / "results.json").write_text(json.dumps(made_up_results()))
    text = reproduce(config, tmp_path / "docs", measure=False).read_text()
    date = json.loads((tmp_path / "docs" / REGIME_LOG).read_text().splitlines()[0])["date"]
    rows = [line for line in text.splitlines() if line.startswith(("| C0 |", "| C1 |")) and date in line]
    assert len(rows) == 2 and rows[0].endswith("| yes |") and rows[1].endswith("| no |")  # the second one never falls
    assert f"| {config.warp.lr} |" in rows[0] and f"| {config.warp.lr / 10} |" in rows[1]
    assert "regime_tried" not in json.loads((tmp_path / "docs" / "results" / "results.json").read_text())


def test_warm_is_reused_only_when_trained_on_the_same_task_and_settings(tmp_path, monkeypatch):
    import json

    from warp_ray.reproduce import runs
    from warp_ray.reward import warm

    (tmp_path / "task" / "sft").mkdir(parents=True)
    trained = []

    def task_inputs(config):
        (tmp_path / "task" / "task.json").write_text(json.dumps({"params": {"pairs": config.task.pairs}}))
        return tmp_path / "task" / "sft", tmp_path / "task" / "prompts", tmp_path / "task" / "preferences", []

    def train_warm(params, *args):  # stands in for the Ray Tune sweep: what matters here is whether it runs
        trained.append(params)
        if len(trained) == 3:
            raise RuntimeError("a trial failed")
        return []

    monkeypatch.setattr(runs, "task_inputs", task_inputs)
    monkeypatch.setattr(warm, "task_inputs", task_inputs)
    monkeypatch.setattr(warm, "preference_splits", lambda folder: {})
    monkeypatch.setattr(warm, "init_ray", lambda: None)
    monkeypatch.setattr(warm, "train_warm", train_warm)
    monkeypatch.setattr(warm, "accuracy_table", lambda folders, merged, splits: {"WARM": {"validation": len(trained)}})

    def config(*overrides: str) -> WarpConfig:
        overrides = [f"paths.output_dir={tmp_path}/out", *overrides]
        return WarpConfig.from_yaml(ROOT / "configs" / "reproduce.yaml", overrides)

    assert runs._task_and_warm(config())[3:] == ({"WARM": {"validation": 1}}, True)
    assert runs._task_and_warm(config())[3:] == ({"WARM": {"validation": 1}}, False)  # read back
    assert runs._task_and_warm(config("task.pairs=2000"))[3:] == ({"WARM": {"validation": 2}}, True)  # another task
    with pytest.raises(RuntimeError, match="a trial failed"):
        runs._task_and_warm(config("warm.steps=300"))  # other WARM settings: trained again, and failing half-way...
    assert runs._task_and_warm(config("task.pairs=2000"))[4]  # ...leaves no record: the next run trains again


def test_an_undefined_standard_error_judges_nothing():
    assert math.isnan(regime._in_units(float("nan"), 0.0)) and math.isnan(regime._in_units(1.0, float("nan")))
    single_prompt = made_up_regime()
    single_prompt["sft"]["control_reward_se"] = float("nan")  # an evaluation of one prompt has no spread
    rise = next(c for c in regime.criteria(single_prompt) if "the rise" in c.name)
    assert rise.holds is False
    with pytest.raises(ConfigError, match="evaluation.prompts >= 2"):
        check_protocol(WarpConfig.from_yaml(ROOT / "configs" / "reproduce.yaml", ["evaluation.prompts=1"]))
