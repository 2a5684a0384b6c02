"""results.md and one figure per claim, drawn from the results JSON alone (so that anyone can redraw
them, or check them against the numbers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from warp_ray.reproduce import protocol  # noqa: E402
from warp_ray.reproduce.claims import (
    angle_summary,
    check_all,
    collapse_step,
    evaluation_se,
    sft_point,
    towards_sft,
    win_rate,
)  # noqa: E402
from warp_ray.reproduce.regime import markdown as regime_markdown  # noqa: E402
from warp_ray.reproduce.regime import summary as regime_summary  # noqa: E402
from warp_ray.reproduce.regime import tried_markdown as regime_tried_markdown  # noqa: E402
from warp_ray.reward.warm import markdown as accuracy_markdown  # noqa: E402

FIGURES = "results"  # beside results.md
BOOTSTRAP_SEED = 0  # the prompt resamples: the report is a pure function of the results


def write_report(results: dict, folder: Path, tried: Sequence[dict] = ()) -> Path:
    """results.md in `folder`, its figures (the first seed's runs) and the results they are drawn
    from in `folder`/results/, with a table of the regime runs `tried` when given; returns the path
    of results.md."""
    (folder / FIGURES).mkdir(parents=True, exist_ok=True)
    (folder / FIGURES / "results.json").write_text(json.dumps(results, indent=1))
    config = results["config"]
    seeds = [protocol.seed_view(results, k) for k in range(len(results["by_seed"]))]
    claims = protocol.judge(check_all, seeds, config["reproduce"]["bootstrap"], np.random.default_rng(BOOTSTRAP_SEED))
    first, sections = seeds[0], []
    for claim, (draw, details) in zip(claims, SECTIONS):
        fig = draw(first)
        fig.tight_layout()
        fig.savefig(folder / FIGURES / f"claim_{claim.number}.png", dpi=110)
        plt.close(fig)
        sections.append(_section(claim, [s["seed"] for s in seeds], details(first)))
    (folder / "results.md").write_text(_header(results, seeds, claims, tried) + "\n" + "\n".join(sections))
    return folder / "results.md"


def _regime_section(seeds: Sequence[dict]) -> list[str]:
    rows = []
    for s in seeds:
        numbers = regime_summary(s["regime"])
        rows.append(
            (
                s["seed"],
                numbers["rise"],
                numbers["rise_in_se"],
                numbers["fall"],
                numbers["fall_in_se"],
                numbers["end_kl"],
            )
        )
    return [
        "## The regime",
        "",
        "Whether the task behaves like RLHF as the papers ran it, against criteria fixed before any claim was "
        f"looked at (`warp_ray/reproduce/regime.py`), on seed {seeds[0]['seed']}'s run:",
        "",
        regime_markdown(seeds[0]["regime"]),
        "",
        "The run of every seed (RL against the best single RM, SFT anchor, beta 0.01; gold reward, SE of a "
        "difference):",
        "",
        _table(("seed", "rise", "rise (SE)", "fall", "fall (SE)", "KL at T"), rows),
        "",
    ]


def _tried_section(entries: list[dict]) -> list[str]:
    return [
        "Every configuration of the task tried, with its regime (`warp-ray reproduce`, and its `--regime-only`, log "
        f"each one in [`{FIGURES}/regime_runs.jsonl`]({FIGURES}/regime_runs.jsonl)):",
        "",
        regime_tried_markdown(entries),
        "",
    ]


def _header(results: dict, seeds: Sequence[dict], claims: Sequence[protocol.JudgedClaim], tried: Sequence[dict]) -> str:
    lines = [
        "# The papers' claims, measured on the built-in task",
        "",
        _provenance(results, seeds),
        "",
        _setting(results["config"], len(seeds)),
        "",
        *(_regime_section(seeds) if "regime" in seeds[0] else []),
        *(_tried_section(tried) if tried else []),
        "| claim | verdict |",
        "|---|---|",
        *(f"| {c.number}. {c.statement} | **{c.verdict}** |" for c in claims),
        "",
        "Time: " + ", ".join(f"{name} {s / 60:.1f} min" for name, s in results["seconds"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


def _provenance(results: dict, seeds: Sequence[dict]) -> str:
    """How the results were made: when, with which seeds, in how long, and where they are."""
    date = results.get("date", "an unrecorded date")
    seed_list = ", ".join(str(s["seed"]) for s in seeds)
    minutes = sum(results["seconds"].values()) / 60
    read_back = results.get("read_back", [])
    earlier = (
        f" (read back from an earlier run: {', '.join(read_back)}; a seed read back counts the minutes it took "
        "then, the task and WARM do not)"
    )
    return (
        f"Produced by `warp-ray reproduce --config configs/reproduce.yaml` on {date}, seeds {seed_list}, in "
        f"{minutes:.0f} minutes of measuring on 2 CPU cores"
        + (earlier if read_back else "")
        + f"; every number and figure below is drawn from the run's results, [`{FIGURES}/results.json`]"
        f"({FIGURES}/results.json) (`--report-only` redraws them)."
    )


def _setting(config: dict, n: int) -> str:
    """The task, the runs, the evaluations and the noise, in words."""
    warp = config["warp"]
    evaluation = config["evaluation"]
    if n > 1:
        noise = (
            f"{n} seeds: the 95% interval of a check's mean margin combines the seeds' spread (Student's t, "
            f"{n - 1} degrees of freedom) with the effect of the held-out prompts that all seeds share (a "
            f"bootstrap over them, {config['reproduce']['bootstrap']} resamples)"
        )
    else:
        noise = (
            "ONE SEED, a quick look: the 95% intervals come from a bootstrap over the held-out prompts of that one "
            "seed's evaluations, and miss the seed-to-seed spread of RL that a rerun would show"
        )
    return (
        f"Setting: the built-in task (a 0.9M-parameter GPT-2, the gold reward as the control), WARM of "
        f"{config['warm']['M']} reward models as the proxy reward, REINFORCE runs of T = {warp['T']} steps of "
        f"{warp['batch_size']} prompts x {warp['samples_per_prompt']} samples (lr {warp['lr']:g}, mu {warp['mu']:g}), "
        f"WARP with M = {warp['M']}, I = {warp['I']}, eta = {warp['eta']:g}. The seeds are fixed in the config before "
        "the run; each is a whole WARP run, the REINFORCE baselines and the merges; the task and WARM are shared. "
        f"Every evaluation: {evaluation['prompts']} held-out prompts x {evaluation['samples_per_prompt']} samples at "
        f"temperature {evaluation['temperature']:g}; KL is to the SFT. Noise: {noise} "
        "(`warp_ray/reproduce/protocol.py`). A check holds when its interval lies above zero, did not hold when below. "
        "Figures and tables beneath each claim show the first seed. Iterations are numbered from 1 here (the run's "
        "folders from 0)."
    )


def _section(claim: protocol.JudgedClaim, seeds: Sequence[int], details: str) -> str:
    def number(value) -> str:
        return "-" if value is None else f"{value:+.3f}"

    lines = [
        f"## Claim {claim.number}: {claim.verdict}",
        "",
        claim.statement,
        "",
        "| check | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | 95% interval | status |",
        "|---" * (len(seeds) + 4) + "|",
    ]
    lines += [
        f"| {c.what} | "
        + " | ".join(number(m) for m in c.margins)
        + f" | {number(c.mean)} | "
        + ("-" if c.mean is None or not np.isfinite([c.low, c.high]).all() else f"[{c.low:+.3f}, {c.high:+.3f}]")
        + f" | {c.status}"
        + (f" (not observed in {c.unobserved_share:.0%} of the prompt resamples)" if c.unobserved_share else "")
        + " |"
        for c in claim.checks
    ]
    lines += ["", f"![claim {claim.number}]({FIGURES}/claim_{claim.number}.png)", "", details, ""]
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return "\n".join(
        [
            "| " + " | ".join(header) + " |",
            "|---" * len(header) + "|",
            *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows),
        ]
    )


def _front_axes(
    ax, lines: dict[str, Sequence[dict]], origin: Optional[dict], key: str = "reward", label_eta: bool = False
) -> None:
    """Each line starts at `origin` (the SFT) unless None."""
    for label, points in lines.items():
        points = sorted([origin, *points] if origin else points, key=lambda p: p.get("eta", p.get("step", 0)))
        (line,) = ax.plot([p["kl_to_sft"] for p in points], [p[key] for p in points], "o-", ms=3, label=label)
        if label_eta:
            for p in points:
                if "eta" in p:
                    ax.annotate(
                        f"{p['eta']:g}", (p["kl_to_sft"], p[key]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                    )
    ax.set(xlabel="KL to the SFT (nats)", ylabel=f"{key.replace('_', ' ')} (held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


# Claim 1 ------------------------------------------------------------------------------------

ANCHOR_RUNS = (
    "EMA anchor, beta 0.01",
    "EMA anchor, beta 0.1",
    "SFT anchor, beta 0",
    "SFT anchor, beta 0.01",
    "SFT anchor, beta 0.1",
)


def _draw_1(results: dict):
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    runs, origin = results["runs"], {**sft_point(results), "step": 0}
    _front_axes(left, {name: runs[name] for name in ANCHOR_RUNS}, origin)
    left.set_title("REINFORCE trajectories (proxy reward)")
    for name in ANCHOR_RUNS:
        right.plot(
            [0] + [p["step"] for p in runs[name]], [0] + [p["kl_to_sft"] for p in runs[name]], "o-", ms=3, label=name
        )
    right.set(xlabel="step", ylabel="KL to the SFT (nats)", title="KL during training")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    return fig


def _details_1(results: dict) -> str:
    runs = results["runs"]
    rows = [
        (
            name,
            runs[name][-1]["step"],
            runs[name][-1]["kl_to_sft"],
            runs[name][-1]["reward"],
            runs[name][-1]["control_reward"],
            max(p["control_reward"] for p in runs[name]),
        )
        for name in ANCHOR_RUNS
    ]
    return "Each run at its last step (held-out):\n\n" + _table(
        ("run", "step", "KL to SFT", "reward (WARM)", "control reward", "best control reward on the way"), rows
    )


# Claim 2 ------------------------------------------------------------------------------------


def _draw_2(results: dict):
    curve = results["interpolation"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key in zip(axes, ("reward", "kl_to_sft")):
        for method in ("slerp", "lerp"):
            ax.errorbar(
                curve["lambda"],
                [p[key] for p in curve[method]],
                yerr=[p[f"{key}_se"] for p in curve[method]],
                marker="o",
                capsize=3,
                label=method.upper(),
            )
        ax.set(xlabel="lambda (weight of the second policy)", ylabel=f"{key.replace('_', ' ')} (held-out)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("Merging two policies: reward")
    axes[1].set_title("KL to the SFT")
    return fig


def _details_2(results: dict) -> str:
    curve = results["interpolation"]
    rows = [
        (
            lam,
            s["reward"],
            lerp["reward"],
            s["kl_to_sft"],
            lerp["kl_to_sft"],
            s["control_reward"],
            lerp["control_reward"],
        )
        for lam, s, lerp in zip(curve["lambda"], curve["slerp"], curve["lerp"])
    ]
    return _table(
        ("lambda", "reward SLERP", "reward LERP", "KL SLERP", "KL LERP", "control SLERP", "control LERP"), rows
    )


# Claim 3 ------------------------------------------------------------------------------------


def _draw_3(results: dict):
    tensors = results["angles"]["tensors"].values()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.hist(np.concatenate([t["task_vector_degrees"] for t in tensors]), bins=36, range=(0, 180))
    left.axvline(90, color="k", lw=0.8)
    left.set(xlabel="angle between task vectors (degrees)", ylabel="tensors x pairs", title="Task vectors, per tensor")
    right.hist(np.concatenate([t["weight_cosine"] for t in tensors]), bins=40)
    right.set(xlabel="cosine between full weights", ylabel="tensors x pairs", title="Full weights, per tensor")
    return fig


def _details_3(results: dict) -> str:
    summary = angle_summary(results)
    rows = [(name, s["median"], s["p5"], s["p95"], s["min"], s["max"]) for name, s in summary.items()]
    pairs = results["angles"]["pairs"]
    return (
        f"Over {len(results['angles']['tensors'])} tensors x {len(pairs)} pairs of the {max(map(max, pairs)) + 1} "
        "policies of "
        "WARP's first iteration:\n\n" + _table(("measure", "median", "5%", "95%", "min", "max"), rows)
    )


# Claims 4 to 6 ------------------------------------------------------------------------------


def _draw_4(results: dict):
    first, origin = results["warp"][0], {**sft_point(results), "step": 0}
    fig, ax = plt.subplots(figsize=(7, 5))
    lines = {f"policy {m + 1} (training)": run for m, run in enumerate(first["trajectories"])}
    _front_axes(ax, lines, origin)
    _front_axes(ax, {"LITI front (eta)": [p for p in first["front"] if p["towards"] == "init"]}, origin, label_eta=True)
    ax.set_title("WARP iteration 1: LITI front and the training runs")
    return fig


def _front_rows(front: Sequence[dict]) -> str:
    return _table(
        ("eta", "KL to SFT", "reward", "control reward"),
        [(p["eta"], p["kl_to_sft"], p["reward"], p["control_reward"]) for p in front],
    )


def _details_4(results: dict) -> str:
    first = results["warp"][0]
    ends = [
        (m + 1, run[-1]["kl_to_sft"], run[-1]["reward"], run[-1]["control_reward"])
        for m, run in enumerate(first["trajectories"])
    ]
    return (
        "LITI front of iteration 1:\n\n"
        + _front_rows([p for p in first["front"] if p["towards"] == "init"])
        + "\n\nThe policies at their last step:\n\n"
        + _table(("policy", "KL to SFT", "reward", "control reward"), ends)
    )


def _draw_5(results: dict):
    fig, ax = plt.subplots(figsize=(7, 5))
    _front_axes(
        ax,
        {
            "SLERP of M = 4, LITI": towards_sft(results["warp"][0]["front"]),
            "SLERP of M = 2, LITI": results["front_two_policies"],
        },
        sft_point(results),
        label_eta=True,
    )
    ax.set_title("More policies merged")
    return fig


def _details_5(results: dict) -> str:
    return (
        "M = 4:\n\n"
        + _front_rows(towards_sft(results["warp"][0]["front"]))
        + "\n\nM = 2 (policies 1 and 2):\n\n"
        + _front_rows(results["front_two_policies"])
    )


def _draw_6(results: dict):
    fig, ax = plt.subplots(figsize=(7, 5))
    for towards, origin in (("sft", sft_point(results)), ("init", None)):  # a front towards the init starts there
        _front_axes(
            ax,
            {
                f"iteration {i + 1}, LITI towards {towards}": [p for p in it["front"] if p["towards"] == towards]
                for i, it in enumerate(results["warp"])
            },
            origin,
            label_eta=True,
        )
    ax.set_title("WARP iterations (the verdict: towards the SFT)")
    return fig


def _details_6(results: dict) -> str:
    return "\n\n".join(
        f"Iteration {i + 1}, towards {towards}:\n\n" + _front_rows([p for p in it["front"] if p["towards"] == towards])
        for towards in ("sft", "init")
        for i, it in enumerate(results["warp"])
    )


# Claim 7 ------------------------------------------------------------------------------------

WARM_RUNS = {"against WARM": "SFT anchor, beta 0.01", "against the single RM": "SFT anchor, beta 0.01, single RM"}


def _draw_7(results: dict):
    table = results["warm"]["accuracy"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    columns = ("flipped pairs (as labelled)", "validation", "ood")
    x = np.arange(len(columns))
    for k, model in enumerate(table):
        left.bar(x + k * 0.8 / len(table), [table[model][c] for c in columns], 0.8 / len(table), label=model)
    left.set_xticks(x + 0.4 - 0.4 / len(table), columns)
    left.set(ylabel="pairwise accuracy", title="Reward models (25% of training labels flipped)", ylim=(0, 1))
    left.legend(fontsize=7)
    for label, name in WARM_RUNS.items():
        run = results["runs"][name]
        right.plot(
            [0] + [p["step"] for p in run],
            [sft_point(results)["control_reward"]] + [p["control_reward"] for p in run],
            "o-",
            label=f"policy trained {label}",
        )
    right.set(
        xlabel="step",
        ylabel="control (gold) reward (held-out)",
        title="RL against WARM vs a single RM (SFT anchor, beta 0.01)",
    )
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    return fig


def _details_7(results: dict) -> str:
    se = np.sqrt(2) * evaluation_se(results, "control_reward")
    rows = [
        (
            label,
            results["runs"][name][-1]["kl_to_sft"],
            max(p["control_reward"] for p in results["runs"][name]),
            max(results["runs"][name], key=lambda p: p["control_reward"])["step"],
            collapse_step(results["runs"][name], se) or "none",
        )
        for label, name in WARM_RUNS.items()
    ]
    return (
        f"Reward models (the single RM of the RL comparison: {results['warm']['single_rm']}, the best on "
        "validation):\n\n"
        + accuracy_markdown(results["warm"]["accuracy"])
        + "\nRL (the proxy rewards differ, the control reward is the same):\n\n"
        + _table(("policy", "final KL to SFT", "peak control reward", "at step", "collapse step"), rows)
    )


# Claim 8 ------------------------------------------------------------------------------------


def _draw_8(results: dict):
    match = results["win_rate"]
    rate = win_rate(match["warp"]["control_rewards"], match["reinforce"]["control_rewards"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.bar(
        ["WARP wins", "ties", "REINFORCE wins"], [rate["wins"], rate["ties"], rate["losses"]], color=["C0", "C7", "C1"]
    )
    left.set(ylabel="paired samples", title=f"Gold-reward comparisons: win rate {rate['rate']:.3f} +- {rate['se']:.3f}")
    bins = np.linspace(
        min(match["warp"]["control_rewards"] + match["reinforce"]["control_rewards"]),
        max(match["warp"]["control_rewards"] + match["reinforce"]["control_rewards"]),
        25,
    )
    right.hist(
        match["warp"]["control_rewards"], bins=bins, alpha=0.6, label=f"WARP (KL {match['warp']['kl_to_sft']:.2f})"
    )
    right.hist(
        match["reinforce"]["control_rewards"],
        bins=bins,
        alpha=0.6,
        label=f"REINFORCE, SFT anchor (KL {match['reinforce']['kl_to_sft']:.2f})",
    )
    right.set(xlabel="gold reward of a held-out sample", ylabel="samples", title="Gold rewards at matched KL")
    right.legend(fontsize=8)
    return fig


def _details_8(results: dict) -> str:
    match = results["win_rate"]
    rate = win_rate(match["warp"]["control_rewards"], match["reinforce"]["control_rewards"])
    rows = [
        (
            "WARP (last iteration's SLERP, LITI towards the SFT, eta = " + f"{match['warp']['eta']:.3f})",
            match["warp"]["kl_to_sft"],
            match["warp"]["reward"],
            match["warp"]["control_reward"],
        ),
        (
            "REINFORCE, SFT anchor, beta 0.1, last step",
            match["reinforce"]["kl_to_sft"],
            match["reinforce"]["reward"],
            match["reinforce"]["control_reward"],
        ),
    ]
    return (
        _table(("policy", "KL to SFT", "reward (WARM)", "control reward"), rows)
        + f"\n\nPaired samples: {rate['wins']} wins, {rate['ties']} ties, {rate['losses']} losses of "
        f"{len(match['warp']['control_rewards'])}: win rate {rate['rate']:.3f} +- {rate['se']:.3f} (ties count half)."
    )


SECTIONS = (
    (_draw_1, _details_1),
    (_draw_2, _details_2),
    (_draw_3, _details_3),
    (_draw_4, _details_4),
    (_draw_5, _details_5),
    (_draw_6, _details_6),
    (_draw_7, _details_7),
    (_draw_8, _details_8),
)
