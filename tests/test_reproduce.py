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
from warp_ray.reproduce import claims
from warp_ray.reproduce.claims import Check, collapse_step, front_gap, win_rate
from warp_ray.reproduce.report import write_report
from warp_ray.reproduce.runs import BASELINES, WARP_RUN, angles, check_protocol

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
    assert set(runs) == {WARP_RUN, *BASELINES}
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
