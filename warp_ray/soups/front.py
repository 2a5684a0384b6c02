"""A rewarded soup's front: the SFT, the soup at every lambda of the grid and the baseline's
policies, each evaluated under every reward on the same held-out samples draw, and drawn as the
paper's Figure 1 draws it (reward 1 against reward 2, the soup's curve against the baseline's points).

One vLLM engine serves every point: it starts from the SFT and is handed each point's weights,
computed in memory from the saved policies (`warp_ray.merge.soup`)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import matplotlib
import ray
from torch import Tensor
from transformers import AutoTokenizer

from warp_ray.checkpoint import load_model_weights
from warp_ray.config import WarpConfig
from warp_ray.evaluation import Evaluator, start_reference, summarise
from warp_ray.learner.learner import engine_args
from warp_ray.merge import simplex_grid, slerp_soup, soup
from warp_ray.rollout.worker import RolloutWorker
from warp_ray.runtime import gpu_options

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

Point = tuple[dict, Mapping[str, Tensor]]
"""A point to evaluate: what it is ({"kind", "lambdas"}) and its weights."""


def evaluate(
    config: WarpConfig, sft: Path, held_out: Sequence, servers: Mapping[str, object], points: Iterable[Point]
) -> list[dict]:
    """Each point's mean of every reward (by its name), KL to the SFT and share cut, each with its
    standard error over prompts (`<key>_se`) and but for the share its per-prompt means
    (`<key>_by_prompt`), on the held-out prompts as a run's evaluations draw them."""
    tokenizer = AutoTokenizer.from_pretrained(sft, trust_remote_code=config.paths.trust_remote_code)
    engine = RolloutWorker.options(**gpu_options(config.resources.gpus_per_engine)).remote(
        str(sft), seed=config.warp.seed, **engine_args(config, sft, tokenizer)
    )
    reference = start_reference(sft, config)
    evaluator = Evaluator(config, held_out, None, reference, rewards=servers)
    keys = (*servers, "kl_to_sft", "truncated")
    results = []
    try:
        for point, weights in points:
            ray.get(engine.update_weights.remote(weights))
            results.append({**point, **summarise(evaluator.samples([engine]), keys)})
    finally:
        ray.kill(engine)
        ray.kill(reference)
    return results


def plot(fronts: Sequence[Sequence[dict]], names: Sequence[str], path: Path, title: str) -> None:
    """The first reward against the second, for each front (a seed's): the soup's points (a curve
    for two rewards, each annotated with lambda_1 and its KL to the SFT when there is one front),
    the baseline's runs and the SFT."""
    x, y = names[:2]
    fig, ax = plt.subplots(figsize=(7, 5.5))
    styles = {"soup": ("o-" if len(names) == 2 else "o", "C0"), "baseline": ("X", "C3"), "sft": ("*", "k")}
    labels = {"soup": "rewarded soup", "baseline": "multi-objective RL", "sft": "SFT"}
    for k, front in enumerate(fronts):
        for kind, (style, colour) in styles.items():
            chosen = [p for p in front if p["kind"] == kind]
            xs, ys = [p[x] for p in chosen], [p[y] for p in chosen]
            ax.plot(xs, ys, style, color=colour, ms=5 if kind == "soup" else 9, label=labels[kind] if k == 0 else None)
            for p in chosen if len(fronts) == 1 and kind != "sft" else []:
                text = f"{p['lambdas'][0]:g} (KL {p['kl_to_sft']:.2f})"
                ax.annotate(text, (p[x], p[y]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel=f"{x} (held-out prompts)", ylabel=f"{y} (held-out prompts)", title=title)
    ax.grid(alpha=0.3)
    legend = f"annotated: lambda_{x} (KL to the SFT)" if len(fronts) == 1 else f"{len(fronts)} seeds"
    ax.legend(fontsize=8, title=legend, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(front: Sequence[dict], names: Sequence[str]) -> str:
    """Markdown: every point's rewards and KL to the SFT, each mean with its standard error over prompts."""
    lines = [
        "| point | lambda | " + " | ".join(names) + " | KL to the SFT | cut by the length limit |",
        "|---" * (len(names) + 4) + "|",
    ]
    for p in front:
        lambdas = ", ".join(f"{x:g}" for x in p["lambdas"]) if p["kind"] != "sft" else ""
        measures = [f"{p[k]:.3f} ± {p[f'{k}_se']:.3f}" for k in (*names, "kl_to_sft")]
        lines.append(f"| {p['kind']} | {lambdas} | " + " | ".join(measures) + f" | {p['truncated']:.0%} |")
    return "\n".join(lines) + "\n"


def points(
    config: WarpConfig, sft: Path, policies: Mapping[str, Path], baseline: Mapping[tuple[float, ...], Path]
) -> Iterator[Point]:
    """The SFT, the soup (soup.interpolation) at every lambda of soup.grid and of the baseline,
    then the baseline's policies, one at a time: a point's weights are made when the evaluation
    reaches it."""
    init = load_model_weights(sft)
    thetas = [load_model_weights(folder) for folder in policies.values()]
    yield {"kind": "sft", "lambdas": None}, init
    for lambdas in sorted({*simplex_grid(len(thetas), config.soup.grid), *baseline}, reverse=True):
        weights = slerp_soup(init, thetas, lambdas) if config.soup.interpolation == "slerp" else soup(thetas, lambdas)
        yield {"kind": "soup", "lambdas": list(lambdas)}, weights
    for lambdas, folder in baseline.items():
        yield {"kind": "baseline", "lambdas": list(lambdas)}, load_model_weights(folder)


def seeds_report(fronts: Sequence[Sequence[dict]], names: Sequence[str]) -> str:
    """Markdown: every point's rewards and KL to the SFT, their mean over the seeds' fronts with the
    seeds' standard deviation (the spread a rerun with another seed shows)."""
    by_point: dict[tuple, list[dict]] = {}
    for front in fronts:
        for p in front:
            by_point.setdefault((p["kind"], tuple(p["lambdas"] or ())), []).append(p)
    lines = [
        "| point | lambda | " + " | ".join(names) + " | KL to the SFT |",
        "|---" * (len(names) + 3) + "|",
    ]
    for (kind, lambdas), points in by_point.items():
        cells = []
        for key in (*names, "kl_to_sft"):
            values = [p[key] for p in points]
            spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.3f}{spread}")
        lines.append(f"| {kind} | {', '.join(f'{x:g}' for x in lambdas)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
