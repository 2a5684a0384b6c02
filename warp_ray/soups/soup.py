"""A rewarded soup (Rame et al., NeurIPS 2023; docs/soups.md), on Ray, for each seed:

    for k in 1..K, in parallel:  theta_k <- RL from theta_sft against R_k
    for lambda on the grid:      theta(lambda) <- sum_k lambda_k theta_k, evaluated under R_1..R_K
    baseline, for a few lambda:  RL from theta_sft against sum_k lambda_k R_k, evaluated the same way

then, over the seeds, whether the soup's front is close to the baseline's (`verdict`). Each
reward has one reward server for every seed; a baseline run's reward asks them all (`WeightedReward`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import ray

from warp_ray.checkpoint import write_atomic
from warp_ray.config import WarpConfig
from warp_ray.data import prompt_splits, read_prompts
from warp_ray.merge import simplex_grid
from warp_ray.reward.server import RewardSource, start_reward_server
from warp_ray.reward.weighted import WeightedReward
from warp_ray.soups import verdict
from warp_ray.soups.front import evaluate, plot, points, report, seeds_report
from warp_ray.soups.training import Run, train


def rewarded_soups(
    config: WarpConfig, sft: Path, prompts: Path, rewards: Mapping[str, RewardSource], say: Callable[[str], None]
) -> dict:
    """Every seed's soup (`seed_soup`), then the verdict over the seeds; writes summary.json,
    front.png (every seed's front) and report.md to paths.output_dir, and returns the summary."""
    out, names = config.paths.output_dir, list(rewards)
    trust = config.paths.trust_remote_code
    servers = {name: start_reward_server(source, config.reward_server, trust) for name, source in rewards.items()}
    for stale in ("summary.json", "report.md", "front.png"):  # an earlier soup's verdict, until this one's
        (out / stale).unlink(missing_ok=True)
    fronts = {}
    try:
        for seed in config.soup.seeds or [config.warp.seed]:
            seed_config = config.model_copy(
                update={
                    "warp": config.warp.model_copy(update={"seed": seed}),
                    "paths": config.paths.model_copy(update={"output_dir": out / f"seed_{seed}"}),
                }
            )
            say(f"seed {seed}: a policy per reward ({', '.join(names)}) and the multi-objective baseline")
            fronts[seed] = seed_soup(seed_config, sft, prompts, servers, say)
    finally:
        for server in servers.values():
            ray.kill(server)
    lambdas = [p["lambdas"] for p in next(iter(fronts.values()))["points"] if p["kind"] == "baseline"]
    judged = [
        {"lambdas": lam, **verdict.judge([verdict.margin(f["points"], lam, names) for f in fronts.values()])}
        for lam in lambdas
    ]
    summary = {
        "rewards": names,
        "seeds": list(fronts),
        "verdict": verdict.overall([j["verdict"] for j in judged]) if judged else None,
        "by_lambda": judged,
    }
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    title = f"Rewarded soup ({config.soup.interpolation}) against multi-objective RL, seeds {list(fronts)}"
    plot([f["points"] for f in fronts.values()], names, out / "front.png", title)
    points_over_seeds = seeds_report([f["points"] for f in fronts.values()], names)
    write_atomic(
        out / "report.md",
        f"# {title}\n\n{verdict.markdown(summary)}\nEvery point, mean ± standard deviation over the seeds:\n\n"
        + points_over_seeds,
    )
    return summary


def seed_soup(
    config: WarpConfig, sft: Path, prompts: Path, servers: Mapping[str, object], say: Callable[[str], None]
) -> dict:
    """One seed's soup and baseline, trained and evaluated; writes front.json, front.png and
    report.md to paths.output_dir and returns what front.json holds."""
    out, params, names = config.paths.output_dir, config.soup, list(servers)
    lambdas = simplex_grid(len(names), params.baseline_grid, interior=True)  # none for baseline_grid 0
    weighted = {run_name(lam): (lam, WeightedReward.remote(list(servers.values()), lam)) for lam in lambdas}
    runs = [Run(name, server) for name, server in servers.items()]
    runs += [Run(name, reward) for name, (_, reward) in weighted.items()]
    try:
        trained = train(config, sft, prompts, runs, out / "runs")
        say(f"seed {config.warp.seed}: the soup on its grid, the baseline and the SFT, under every reward")
        held_out = read_prompts(prompt_splits(prompts)["held_out"], config.data)
        policies = {name: trained[name] for name in names}
        baseline = {lam: trained[name] for name, (lam, _) in weighted.items()}
        front = evaluate(config, sft, held_out, servers, points(config, sft, policies, baseline))
    finally:
        for _, reward in weighted.values():
            ray.kill(reward)
    result = {
        "rewards": names,
        "seed": config.warp.seed,
        "policy_run": params.policy_run,
        "interpolation": params.interpolation,
        "policies": {name: str(folder) for name, folder in trained.items()},
        "points": front,
    }
    write_atomic(out / "front.json", json.dumps(result, indent=2))
    title = f"Rewarded soup ({params.interpolation}) against multi-objective RL, seed {config.warp.seed}"
    plot([front], names, out / "front.png", title)
    serve = f"warp-ray merge soup --models {' '.join(str(policies[n]) for n in names)} --lambdas ... --out <folder>"
    write_atomic(out / "report.md", f"# {title}\n\n{report(front, names)}\nAny lambda, later: `{serve}`\n")
    return result


def run_name(lambdas: tuple[float, ...]) -> str:
    """A baseline run's name, and its folder's: lambda_0.25_0.75."""
    return "lambda_" + "_".join(f"{x:g}" for x in lambdas)
