"""The regime of the testbed: does the built-in task behave like RLHF as the papers ran it? Measured
before any claim, against criteria fixed here in advance, and about the task, never the claims.

| criterion                   | measure                                                      | holds when              |
|-----------------------------|--------------------------------------------------------------|-------------------------|
| the SFT finishes            | held-out SFT completions not cut by the length limit         | >= 95%                  |
| room above the SFT          | the SFT's mean gold reward, and the best the gold gives      | reported                |
| label ceiling               | validation accuracy of the gold reward's own BT labels       | >= 0.75                 |
| a reward model near it      | the best single fine-tuned RM's validation accuracy          | >= ceiling - 0.05       |
| over-optimisation, the rise | RL against that RM (SFT anchor, beta 0.01): peak - SFT gold  | >= 3 SE of a difference |
| over-optimisation, the fall | gold at T below the peak, with KL at T above the peak's      | > 2 SE of a difference  |
| the EMA is fast             | 1/mu against T                                               | 1/mu <= T / 10          |
| KL grows gradually          | KL to the SFT at 10%, 50%, 100% of T                         | KL(T/10) <= 0.3 KL(T),  |
|                             |                                                              | KL(T) >= 1 nat          |

The label ceiling is what a reward model that knew the gold reward would score on the validation
labels, which a Bradley-Terry draw made from it (ties count half). Standard errors take prompts as
the unit (`warp_ray.evaluation.mean_and_se`); the peak is the best of the run's evaluations, so a
rise of 3 SE of a difference is a margin for picking the maximum of about ten, not a test of it.
The RL run is the reproduction's own "SFT anchor, beta 0.01, single RM" baseline, from the same
seed, evaluated every T / 10 steps (`runs.measure_regime`); the functions here are pure functions
of its numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

FINISHED = 0.95
LABEL_CEILING = 0.75
RM_BELOW_CEILING = 0.05
RISE_SE, FALL_SE = 3.0, 2.0
EMA_STEPS_PER_T = 0.1
EARLY_KL_SHARE = 0.3
KL_FLOOR = 1.0
BETA = 0.01


@dataclass
class Criterion:
    name: str
    measured: str
    wanted: str
    holds: bool | None  # None: reported, no threshold


def label_ceiling(pairs: Sequence[dict]) -> float:
    """The gold reward scored as a reward model on pairs that a Bradley-Terry draw from it labelled."""
    return sum(
        1.0 if p["gold_chosen"] > p["gold_rejected"] else 0.5 if p["gold_chosen"] == p["gold_rejected"] else 0.0
        for p in pairs
    ) / len(pairs)


def summary(regime: dict) -> dict[str, float]:
    """The numbers the criteria judge, from `runs.measure_regime`'s measures."""
    sft = regime["sft"]
    run = regime["run"]
    T = regime["T"]
    peak = max(run, key=lambda p: p["control_reward"])
    end = run[-1]
    rise_se = math.hypot(peak["control_reward_se"], sft["control_reward_se"])
    fall_se = math.hypot(peak["control_reward_se"], end["control_reward_se"])
    return {
        "finished": 1 - sft["truncated"],
        "sft_gold": sft["control_reward"],
        "sft_gold_se": sft["control_reward_se"],
        "best_gold": regime["best_gold_reward"],
        "ceiling": regime["label_ceiling"],
        "best_rm": regime["best_single_rm"]["accuracy"],
        "peak_step": peak["step"],
        "rise": peak["control_reward"] - sft["control_reward"],
        "rise_in_se": _in_units(peak["control_reward"] - sft["control_reward"], rise_se),
        "fall": peak["control_reward"] - end["control_reward"],
        "fall_in_se": _in_units(peak["control_reward"] - end["control_reward"], fall_se),
        "peak_kl": peak["kl_to_sft"],
        "end_kl": end["kl_to_sft"],
        "ema_steps": _in_units(1.0, regime["mu"]),
        "T": T,
        **{f"kl_{round(100 * share)}": _at(run, share * T)["kl_to_sft"] for share in (0.1, 0.5, 1.0)},
    }


def criteria(regime: dict) -> list[Criterion]:
    """The criteria of the module docstring, checked against `runs.measure_regime`'s measures."""
    n = summary(regime)
    return [
        Criterion(
            "the SFT finishes within the length limit",
            f"{n['finished']:.1%}",
            f">= {FINISHED:.0%}",
            n["finished"] >= FINISHED,
        ),
        Criterion(
            "room above the SFT (gold reward)",
            f"SFT {n['sft_gold']:.2f} +- {n['sft_gold_se']:.2f}, best {n['best_gold']:.1f}",
            "reported",
            None,
        ),
        Criterion(
            "label ceiling (validation)", f"{n['ceiling']:.3f}", f">= {LABEL_CEILING}", n["ceiling"] >= LABEL_CEILING
        ),
        Criterion(
            "best single RM (validation accuracy)",
            f"{n['best_rm']:.3f} ({regime['best_single_rm']['name']})",
            f">= {n['ceiling'] - RM_BELOW_CEILING:.3f}",
            n["best_rm"] >= n["ceiling"] - RM_BELOW_CEILING,
        ),
        Criterion(
            f"over-optimisation, the rise: peak gold - SFT gold (beta {BETA}, single RM)",
            f"{n['rise']:+.2f} at step {n['peak_step']} ({n['rise_in_se']:.1f} SE)",
            f">= {RISE_SE:g} SE",
            n["rise_in_se"] >= RISE_SE,
        ),
        Criterion(
            "over-optimisation, the fall: peak gold - gold at T",
            f"{n['fall']:+.2f} ({n['fall_in_se']:.1f} SE), KL {n['peak_kl']:.2f} -> {n['end_kl']:.2f}",
            f"> {FALL_SE:g} SE, KL rising",
            n["fall_in_se"] > FALL_SE and n["end_kl"] > n["peak_kl"],
        ),
        Criterion(
            "the EMA is fast: 1/mu against T",
            f"1/mu = {n['ema_steps']:.0f}, T = {n['T']}",
            f"1/mu <= {EMA_STEPS_PER_T * n['T']:g}",
            n["ema_steps"] <= EMA_STEPS_PER_T * n["T"],
        ),
        Criterion(
            "KL to the SFT at 10%, 50%, 100% of T",
            f"{n['kl_10']:.2f}, {n['kl_50']:.2f}, {n['kl_100']:.2f}",
            f"KL(T/10) <= {EARLY_KL_SHARE} KL(T), KL(T) >= {KL_FLOOR:g}",
            n["kl_10"] <= EARLY_KL_SHARE * n["kl_100"] and n["kl_100"] >= KL_FLOOR,
        ),
    ]


def _in_units(value: float, unit: float) -> float:
    """value / unit; a zero unit makes any non-zero value infinitely many of it; NaN in, NaN out."""
    if math.isnan(value) or math.isnan(unit):
        return math.nan
    if unit > 0:
        return value / unit
    return math.copysign(math.inf, value) if value else 0.0


def _at(run: Sequence[dict], step: float) -> dict:
    return min(run, key=lambda p: abs(p["step"] - step))


def markdown(regime: dict) -> str:
    rows = [
        f"| {c.name} | {c.measured} | {c.wanted} | {'n/a' if c.holds is None else 'yes' if c.holds else '**no**'} |"
        for c in criteria(regime)
    ]
    return "\n".join(["| criterion | measured | wanted | holds |", "|---|---|---|---|", *rows])


SETTINGS = (
    "task.pairs",
    "task.pair_checkpoints",
    "task.pair_temperatures",
    "warm.steps",
    "warm.learning_rates",
    "warp.max_new_tokens",
    "warp.lr",
    "warp.mu",
    "warp.T",
)
"""The settings a regime run is told apart by in the table of configurations tried."""


def tried_markdown(entries: Sequence[dict]) -> str:
    """One row per regime run ({"date", "config", "regime"}, as `warp-ray reproduce --regime-only` logs
    them, labelled C0, C1, ... in that order): its settings, its measures, whether every criterion held."""
    measures = [
        "finished",
        "SFT gold",
        "ceiling",
        "best RM",
        "rise (SE)",
        "fall (SE)",
        "KL at 10/50/100% T",
        "all hold",
    ]
    header = ["run", "date", "world", *SETTINGS, *measures]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for i, entry in enumerate(entries):
        n, config = summary(entry["regime"]), entry["config"]
        settings = [str(config[key.split(".")[0]][key.split(".")[1]]) for key in SETTINGS]
        held = all(c.holds is not False for c in criteria(entry["regime"]))
        row = [
            f"C{i}",
            entry["date"],
            entry.get("world", "-"),
            *settings,
            f"{n['finished']:.1%}",
            f"{n['sft_gold']:.2f}",
            f"{n['ceiling']:.3f}",
            f"{n['best_rm']:.3f}",
            f"{n['rise']:+.2f} ({n['rise_in_se']:.1f})",
            f"{n['fall']:+.2f} ({n['fall_in_se']:.1f})",
            f"{n['kl_10']:.1f} / {n['kl_50']:.1f} / {n['kl_100']:.1f}",
            "yes" if held else "no",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
