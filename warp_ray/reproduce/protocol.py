"""The protocol: each claim's checks measured over seeds, with the noise a rerun would show
(docs/algorithms.md#noise-and-intervals-of-the-reproduction).

A check's margin (claims.py) is measured once per seed, on the same held-out prompts for every
seed. What rerunning with other seeds would change:
- the seeds' spread: the sample variance s^2 of the n per-seed margins. It holds RL's randomness,
  each seed's sampled completions, and how each seed's policies fare on each prompt;
- the held-out prompts themselves, which every seed shares, so s^2 cannot show them: how much
  the margins of all seeds move together when other prompts are drawn. A bootstrap over the
  prompts (one draw of prompt indices applied to every evaluation of every seed) gives it as the
  mean covariance c between two seeds' resampled margins; with one seed, as the variance of its
  resampled margin (which then also holds that seed's sampling noise);
- any sampling variance a check knows of its own (`Check.variance`: a reward model's accuracy on
  finite pairs, which neither the seeds nor the prompts resample).

The 95% interval is mean +- sqrt(t^2 s^2 / n + 1.96^2 (c + own)), t Student's 97.5% quantile for
n - 1 degrees of freedom (s^2 is estimated from n seeds; c and own from many draws). It adds the
parts' half-widths in quadrature, a plain rule rather than a calibrated one (Welch-Satterthwaite
would pool the degrees of freedom). With one seed there is no s^2: the interval misses the
seed-to-seed spread of RL, and the report says so; a check that no resample of the prompts moves
either (claim 3's angles) then has no noise estimate at all, and is within noise by construction.
A check holds when its interval lies above
zero (the direction every claim states), did not hold when below, and is within noise
otherwise, or when more than 5% of the prompt resamples lose what it is about (a collapse that
only some draws of prompts show); "not observed" when that did not happen in some seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from warp_ray.errors import WarpRayError
from warp_ray.evaluation import Z_975, t_975
from warp_ray.reproduce.claims import Claim

HELD, NOISE, FAILED, UNOBSERVED = "held", "within noise", "did not hold", "not observed"

UNSTABLE_SHARE = 0.05


@dataclass
class Judged:
    """A check over the seeds: its per-seed margins, their mean and 95% interval, the share of
    prompt resamples in which it was not observed, its status."""

    what: str
    margins: list[Optional[float]]
    mean: Optional[float] = None
    low: Optional[float] = None
    high: Optional[float] = None
    unobserved_share: float = 0.0

    @property
    def status(self) -> str:
        if self.mean is None:
            return UNOBSERVED
        if self.unobserved_share > UNSTABLE_SHARE or not np.isfinite([self.low, self.high]).all():
            return NOISE
        return HELD if self.low > 0 else FAILED if self.high < 0 else NOISE


@dataclass
class JudgedClaim:
    number: int
    statement: str
    checks: list[Judged]

    @property
    def verdict(self) -> str:
        statuses = [c.status for c in self.checks]
        return next((s for s in (FAILED, UNOBSERVED, NOISE) if s in statuses), HELD)


def seed_view(results: dict, k: int) -> dict:
    """The k-th seed's results with the shared ones (config, WARM): what a claim is checked on."""
    return {**{key: value for key, value in results.items() if key != "by_seed"}, **results["by_seed"][k]}


def prompt_count(results) -> int:
    """The number of held-out prompts of a seed's evaluations; every evaluation (a dict with a
    reward, a control reward and a KL) must carry its per-prompt means, over that many prompts."""
    counts: dict[int, str] = {}

    def walk(node, where: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")
        elif isinstance(node, dict):
            if {"reward", "control_reward", "kl_to_sft"} <= node.keys():
                for key in ("reward", "control_reward", "kl_to_sft"):
                    if f"{key}_by_prompt" not in node:
                        raise WarpRayError(
                            f"the evaluation at {where or 'the top'} has no {key}_by_prompt: the bootstrap "
                            "over prompts needs every evaluation's per-prompt means"
                        )
                    counts.setdefault(len(node[f"{key}_by_prompt"]), where)
            for key, item in node.items():
                walk(item, f"{where}.{key}" if where else key)

    walk(results, "")
    if not counts:
        raise WarpRayError("no evaluation found in a seed's results")
    if len(counts) != 1:
        raise WarpRayError(
            "evaluations over different numbers of held-out prompts: "
            + ", ".join(f"{n} at {where}" for n, where in counts.items())
        )
    return next(iter(counts))


def resample(results, prompts: np.ndarray):
    """A seed's results with every evaluation taken over the held-out prompts `prompts` (indices,
    repeats allowed): each mean recomputed from its per-prompt means (`<key>_by_prompt`), and
    per-sample lists (`control_rewards`, prompt after prompt) drawn for those prompts."""
    if isinstance(results, list):
        return [resample(v, prompts) for v in results]
    if not isinstance(results, dict):
        return results
    out = {k: resample(v, prompts) for k, v in results.items() if not k.endswith("_by_prompt")}
    for key, values in results.items():
        if key.endswith("_by_prompt"):
            out[key.removesuffix("_by_prompt")] = float(np.mean(np.asarray(values)[prompts]))
    if "control_rewards" in results:
        per_prompt = np.asarray(results["control_rewards"]).reshape(len(results["control_reward_by_prompt"]), -1)
        out["control_rewards"] = per_prompt[prompts].ravel().tolist()
    return out


def judge(
    check_all: Callable[[dict], list[Claim]], seeds: Sequence[dict], resamples: int, rng: np.random.Generator
) -> list[JudgedClaim]:
    """Every claim of `check_all` over the seeds' results, each check with its interval."""
    prompts = {prompt_count(results) for results in seeds}
    if len(prompts) != 1:
        raise WarpRayError(f"the seeds were evaluated on different numbers of held-out prompts: {sorted(prompts)}")
    count, n = prompts.pop(), len(seeds)
    measured = [check_all(results) for results in seeds]
    point = np.array([_margins(claims) for claims in measured])  # seeds x checks; NaN: not observed
    # resamples x seeds x checks
    boot = np.array(
        [
            [_margins(check_all(resample(results, drawn))) for results in seeds]
            for drawn in (rng.integers(0, count, count) for _ in range(resamples))
        ]
    )
    judged, k = [], 0
    for claim in measured[0]:
        checks = []
        for check in claim.checks:
            margins = point[:, k]
            if np.isnan(margins).any():
                checks.append(Judged(check.what, [None if np.isnan(m) else float(m) for m in margins]))
            else:
                observed = np.isfinite(boot[:, :, k]).all(axis=1)
                shared = _shared_prompt_variance(boot[observed, :, k])
                seeds_part = t_975(n - 1) ** 2 * margins.var(ddof=1) / n if n > 1 else 0.0
                noise = seeds_part + Z_975**2 * (shared + check.variance)
                # One seed and nothing that varies with the prompts (the angles of claim 3): no noise estimate at all.
                half = float(np.sqrt(noise)) if n > 1 or noise > 0 else np.nan
                mean = float(margins.mean())
                checks.append(
                    Judged(check.what, margins.tolist(), mean, mean - half, mean + half, 1 - float(observed.mean()))
                )
            k += 1
        judged.append(JudgedClaim(claim.number, claim.statement, checks))
    return judged


def _shared_prompt_variance(draws: np.ndarray) -> float:
    """From resampled margins (draws x seeds): the mean covariance between two seeds (the prompts'
    effect that all seeds share), or with one seed its variance; never below 0."""
    if len(draws) < 2:
        return np.nan
    if draws.shape[1] == 1:
        return float(draws[:, 0].var(ddof=1))
    covariance = np.cov(draws, rowvar=False)
    off_diagonal = covariance[~np.eye(len(covariance), dtype=bool)]
    return max(0.0, float(off_diagonal.mean()))


def _margins(claims: Sequence[Claim]) -> list[float]:
    return [np.nan if c.margin is None else c.margin for claim in claims for c in claim.checks]
