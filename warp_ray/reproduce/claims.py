"""The papers' claims, each a list of checks measured on one seed's results (pure functions of the
JSON `runs.measure` writes). A check is a margin that the claim says is positive; protocol.py
measures it over the seeds, with the noise a rerun would show, and judges it.

Fronts are compared as the best reward reachable within a KL budget (a run's or a front's points
with KL at most k, the SFT included), averaged over the budgets both reach: above zero, the first
front is higher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class Check:
    what: str
    margin: Optional[float]  # None: what it is about did not happen (a collapse that never came)
    variance: float = 0.0  # sampling variance that neither the seeds nor the held-out prompts show


@dataclass
class Claim:
    number: int
    statement: str
    checks: list[Check]


def best_within(points: Sequence[dict], kl: float, key: str = "reward") -> float:
    """The best `key` among the points whose KL to the SFT is at most kl."""
    return max((p[key] for p in points if p["kl_to_sft"] <= kl), default=-np.inf)


def front_gap(a: Sequence[dict], b: Sequence[dict], origin: dict, key: str = "reward") -> float:
    """How much higher front a is than front b: the best reward within each KL budget, a minus b,
    averaged over the budgets up to the largest KL both reach (both start at the SFT, `origin`)."""
    a, b = [origin, *a], [origin, *b]
    top = min(max(p["kl_to_sft"] for p in a), max(p["kl_to_sft"] for p in b))
    if top <= 0:
        return 0.0
    return float(np.mean([best_within(a, k, key) - best_within(b, k, key) for k in np.linspace(0, top, 101)[1:]]))


def win_rate(ours: Sequence[float], theirs: Sequence[float]) -> dict:
    """Paired comparison (sample k of each policy, same prompt): wins, ties (count half), losses, the
    rate and its standard error."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    wins, ties = int((ours > theirs).sum()), int((ours == theirs).sum())
    rate = (wins + ties / 2) / len(ours)
    return {
        "wins": wins,
        "ties": ties,
        "losses": len(ours) - wins - ties,
        "rate": rate,
        "se": float(np.sqrt(rate * (1 - rate) / len(ours))),
    }


def collapse_step(run: Sequence[dict], noise: float) -> Optional[int]:
    """The first evaluation after the control reward's peak that falls more than 2 * noise below it."""
    peak = int(np.argmax([p["control_reward"] for p in run]))
    return next(
        (p["step"] for p in run[peak + 1 :] if p["control_reward"] < run[peak]["control_reward"] - 2 * noise), None
    )


def evaluation_se(results: dict, key: str = "reward") -> float:
    """The median standard error of a held-out mean, over the reproduction's own evaluations: the
    size of a fall that counts as a collapse."""
    points = [
        *results["interpolation"]["slerp"],
        *results["interpolation"]["lerp"],
        *results["front_two_policies"],
        *results["win_rate"].values(),
    ]
    return float(np.median([p[f"{key}_se"] for p in points]))


def sft_point(results: dict) -> dict:
    return next(p for p in results["warp"][0]["front"] if p["eta"] == 0)


def towards_sft(front: Sequence[dict]) -> list[dict]:
    return [p for p in front if p.get("towards", "sft") == "sft"]


def claim_1(results: dict) -> Claim:
    runs, sft = results["runs"], sft_point(results)
    checks = [
        Check(
            f"front of the EMA anchor above the SFT anchor's, beta {beta} (mean reward gap)",
            front_gap(runs[f"EMA anchor, beta {beta}"], runs[f"SFT anchor, beta {beta}"], sft),
        )
        for beta in ("0.01", "0.1")
    ]
    unregularized, regularized = (
        runs["SFT anchor, beta 0"][-1]["kl_to_sft"],
        runs["SFT anchor, beta 0.1"][-1]["kl_to_sft"],
    )
    checks.append(
        Check(
            "beta 0 hacks: its final KL over twice the SFT anchor's at beta 0.1 (KL - 2 KL, nats)",
            unregularized - 2 * regularized,
        )
    )
    return Claim(
        1,
        "EMA anchor vs SFT anchor: with equal steps, REINFORCE with the EMA anchor reaches a better KL-reward front "
        "than with the SFT anchor at beta in {0.01, 0.1}, and beta = 0 hacks: KL explodes.",
        checks,
    )


def claim_2(results: dict) -> Claim:
    curve = results["interpolation"]
    half = curve["lambda"].index(0.5)
    s = curve["slerp"][half]
    lerp = curve["lerp"][half]
    ends = (curve["slerp"][0], curve["slerp"][-1])
    best_end = max(ends, key=lambda p: p["reward"])
    return Claim(
        2,
        "SLERP vs LERP: merging two independently trained policies, SLERP gives higher reward and somewhat higher KL "
        "than LERP, and both beat the two endpoints on reward at lambda = 1/2.",
        [
            Check("reward: SLERP - LERP at lambda 1/2", s["reward"] - lerp["reward"]),
            Check("KL: SLERP - LERP at lambda 1/2", s["kl_to_sft"] - lerp["kl_to_sft"]),
            Check(
                "reward: the worse merge at lambda 1/2 - the better endpoint",
                min(s["reward"], lerp["reward"]) - best_end["reward"],
            ),
        ],
    )


def angle_summary(results: dict) -> dict:
    tensors = results["angles"]["tensors"].values()
    flat = {
        key: np.concatenate([t[key] for t in tensors]) for key in ("task_vector_degrees", "norm_ratio", "weight_cosine")
    }
    return {
        key: {
            "median": float(np.median(v)),
            "p5": float(np.percentile(v, 5)),
            "p95": float(np.percentile(v, 95)),
            "min": float(v.min()),
            "max": float(v.max()),
        }
        for key, v in flat.items()
    }


def claim_3(results: dict) -> Claim:
    summary = angle_summary(results)
    return Claim(
        3,
        "Task vectors of independent runs are close to orthogonal (per-tensor angles), full weights are nearly "
        "colinear.",
        [
            Check(
                "task vectors: median per-tensor angle within 10 degrees of 90 (10 - abs(median - 90))",
                10 - abs(summary["task_vector_degrees"]["median"] - 90),
            ),
            Check(
                "full weights: median per-tensor cosine above 0.99 (median - 0.99)",
                summary["weight_cosine"]["median"] - 0.99,
            ),
        ],
    )


def claim_4(results: dict) -> Claim:
    first = results["warp"][0]
    front = [p for p in first["front"] if p["towards"] == "init"]
    trajectories = [p for run in first["trajectories"] for p in run]
    return Claim(
        4,
        "LITI: the front traced by eta lies above the learners' training trajectories.",
        [
            Check(
                "LITI front (iteration 1) above the M training trajectories (mean reward gap)",
                front_gap(front, trajectories, sft_point(results)),
            )
        ],
    )


def claim_5(results: dict) -> Claim:
    four = towards_sft(results["warp"][0]["front"])
    return Claim(
        5,
        "More policies: merging M = 4 gives a better front than M = 2.",
        [
            Check(
                "LITI front of the SLERP of 4 policies above that of 2 of them (mean reward gap)",
                front_gap(four, results["front_two_policies"], sft_point(results)),
            )
        ],
    )


def claim_6(results: dict) -> Claim:
    fronts = [towards_sft(iteration["front"]) for iteration in results["warp"]]
    return Claim(
        6,
        "Iterations: WARP iteration 2 improves the front over iteration 1.",
        [
            Check(
                "LITI front towards the SFT, iteration 2 above iteration 1 (mean reward gap)",
                front_gap(fronts[1], fronts[0], sft_point(results)),
            )
        ],
    )


def claim_7(results: dict) -> Claim:
    table, pairs = results["warm"]["accuracy"], results["warm"]["pairs"]
    flipped = results["config"]["task"]["label_noise"] * pairs["train"]

    def accuracy_variance(column: str, count: float) -> float:  # of a difference of two accuracies near p
        p = table["ENS"][column]
        return float(2 * p * (1 - p) / count)

    warm, single = results["runs"]["SFT anchor, beta 0.01"], results["runs"]["SFT anchor, beta 0.01, single RM"]
    control_se = evaluation_se(results, "control_reward")
    peak = {name: max(p["control_reward"] for p in run) for name, run in (("warm", warm), ("single", single))}
    collapse = {name: collapse_step(run, np.sqrt(2) * control_se) for name, run in (("warm", warm), ("single", single))}
    later = None
    # WARM's collapse, or the end of its run when it never came, minus the single RM's
    if collapse["single"] is not None:
        later = (collapse["warm"] or warm[-1]["step"] + 1) - collapse["single"]
    return Claim(
        7,
        "WARM: with 25% flipped labels, WA fits flipped labels less than ENS and is at least as accurate as ENS out of "
        "distribution; a policy trained against WARM (M = 4) reaches a higher control (gold) reward, and collapses "
        "later, than one trained against a single RM.",
        [
            Check(
                "flipped training labels fitted: ENS - WARM",
                table["ENS"]["flipped pairs (as labelled)"] - table["WARM"]["flipped pairs (as labelled)"],
                accuracy_variance("flipped pairs (as labelled)", flipped),
            ),
            Check(
                "OOD accuracy: WARM - ENS (at least as accurate)",
                table["WARM"]["ood"] - table["ENS"]["ood"],
                accuracy_variance("ood", pairs["ood"]),
            ),
            Check("peak control reward under RL: against WARM - against the single RM", peak["warm"] - peak["single"]),
            Check(
                "collapse (control reward past its peak by 2 noise): step against WARM - against the single RM", later
            ),
        ],
    )


def claim_8(results: dict) -> Claim:
    match = results["win_rate"]
    rate = win_rate(match["warp"]["control_rewards"], match["reinforce"]["control_rewards"])
    kl_warp, kl_reinforce = match["warp"]["kl_to_sft"], match["reinforce"]["kl_to_sft"]
    return Claim(
        8,
        "The win rate, under the gold reward, of the final WARP policy against the REINFORCE policy with the SFT "
        "anchor, "
        "at matched KL.",
        [
            Check("win rate - 1/2", rate["rate"] - 0.5),
            Check(
                "KL matched: 10% of the REINFORCE policy's KL - abs(difference)",
                0.1 * kl_reinforce - abs(kl_warp - kl_reinforce),
            ),
        ],
    )


CLAIMS = (claim_1, claim_2, claim_3, claim_4, claim_5, claim_6, claim_7, claim_8)


def check_all(results: dict) -> list[Claim]:
    return [claim(results) for claim in CLAIMS]
