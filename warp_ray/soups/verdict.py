"""Is the rewarded soup's front close to multi-objective RL's? (docs/soups.md#protocol)

For a baseline run at lambda, a user who wants the trade-off lambda takes the soup's best point
for it, so the margin is

    margin(lambda) = lambda . R(MORL_lambda) - max over the grid's lambda' of lambda . R(soup_lambda')

(above 0: multi-objective RL beats the soup), on the scale of what that run gained over the SFT,
gain(lambda) = lambda . R(MORL_lambda) - lambda . R(SFT). The soup is close at lambda when the
margin's 95% interval lies below TOLERANCE * gain, not close when it lies above, and within noise
otherwise. The interval over n seeds is mean +- sqrt(t^2 s^2 / n + 1.96^2 v): s^2 the seeds'
spread, t Student's 97.5% quantile for n - 1 degrees of freedom, v the mean over seeds of each
margin's squared standard error over the held-out prompts. Every seed shares those prompts, so
their noise is counted whole, as if it moved every seed's margin together: the widest case.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from warp_ray.evaluation import Z_975, t_975

TOLERANCE = 0.1
"""Close: the soup gives up at most a tenth of what multi-objective RL gains over the SFT."""
CLOSE, NOT_CLOSE, NOISE, NO_GAIN = "close", "not close", "within noise", "the baseline gained nothing"
VERDICTS = (CLOSE, NOT_CLOSE, NOISE, NO_GAIN)


def weighted(point: dict, lambdas: Sequence[float], names: Sequence[str], by_prompt: bool = False):
    """lambda . R at a point: its mean, or with `by_prompt` its per-prompt means."""
    if by_prompt:
        columns = zip(*(point[f"{name}_by_prompt"] for name in names))
        return [sum(x * r for x, r in zip(lambdas, row)) for row in columns]
    return sum(x * point[name] for x, name in zip(lambdas, names))


def margin(front: Sequence[dict], lambdas: Sequence[float], names: Sequence[str]) -> dict:
    """One seed's margin at a baseline run's lambda, its standard error over the prompts (the two
    points score the same prompts: paired), the baseline's gain, the soup's best lambda, and the
    margin against the soup at the same lambda when the grid has it."""
    lambdas = list(lambdas)

    def score(point: dict) -> float:
        return weighted(point, lambdas, names)

    soups = [p for p in front if p["kind"] == "soup"]
    baseline = next(p for p in front if p["kind"] == "baseline" and p["lambdas"] == lambdas)
    sft = next(p for p in front if p["kind"] == "sft")
    best = max(soups, key=score)
    same = next((p for p in soups if p["lambdas"] == lambdas), None)
    ours, theirs = weighted(baseline, lambdas, names, by_prompt=True), weighted(best, lambdas, names, by_prompt=True)
    differences = [a - b for a, b in zip(ours, theirs)]
    return {
        "margin": score(baseline) - score(best),
        "se": statistics.stdev(differences) / math.sqrt(len(differences)),
        "gain": score(baseline) - score(sft),
        "best_soup_lambdas": best["lambdas"],
        "same_lambda_margin": None if same is None else score(baseline) - score(same),
    }


def judge(margins: Sequence[dict]) -> dict:
    """The seeds' margins at one lambda: their mean, 95% interval, tolerance and verdict."""
    values, n = [m["margin"] for m in margins], len(margins)
    mean = statistics.mean(values)
    spread = statistics.variance(values) if n > 1 else 0.0
    t = t_975(n - 1)
    half = math.sqrt(t**2 * spread / n + Z_975**2 * statistics.mean(m["se"] ** 2 for m in margins))
    gain = statistics.mean(m["gain"] for m in margins)
    tolerance = TOLERANCE * gain
    if gain <= 0:
        verdict = NO_GAIN
    else:
        verdict = CLOSE if mean + half < tolerance else NOT_CLOSE if mean - half > tolerance else NOISE
    same = [m["same_lambda_margin"] for m in margins]
    return {
        "margins": values,
        "best_soup_lambdas": [m["best_soup_lambdas"] for m in margins],
        "same_lambda_margins": same,
        "same_lambda_mean": None if None in same else statistics.mean(same),
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "gain": gain,
        "tolerance": tolerance,
        "verdict": verdict,
        "seeds": n,
    }


def overall(verdicts: Sequence[str]) -> str:
    """The claim over every baseline lambda: close only if close at each."""
    return next((v for v in (NOT_CLOSE, NO_GAIN, NOISE) if v in verdicts), CLOSE)


def markdown(summary: dict) -> str:
    """The verdict at each baseline lambda: the seeds' margins, their mean and interval, the tolerance."""
    if not summary["by_lambda"]:
        return "No baseline was run (soup.baseline_grid = 0): nothing to judge the soup against.\n"
    one_seed = (
        " With one seed the interval holds the held-out prompts' noise only, not the spread between seeds "
        "that a rerun would show: run more seeds (soup.seeds) before trusting it."
        if len(summary["seeds"]) < 2
        else ""
    )
    lines = [
        f"Verdict over seeds {summary['seeds']}: **{summary['verdict']}**.{one_seed}",
        "",
        "| lambda | margin per seed | mean [95% interval] | tolerance (0.1 x gain) | verdict "
        "| soup's best lambda per seed | margin at the same lambda, mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for j in summary["by_lambda"]:
        per_seed = ", ".join(f"{m:+.3f}" for m in j["margins"])
        interval = f"{j['mean']:+.3f} [{j['low']:+.3f}, {j['high']:+.3f}]"
        lambdas = ", ".join(f"{x:g}" for x in j["lambdas"])
        best = "; ".join(", ".join(f"{x:g}" for x in b) for b in j["best_soup_lambdas"])
        same = "" if j["same_lambda_mean"] is None else f"{j['same_lambda_mean']:+.3f}"
        lines.append(
            f"| {lambdas} | {per_seed} | {interval} | {j['tolerance']:.3f} | {j['verdict']} | {best} | {same} |"
        )
    return "\n".join(lines) + "\n"
