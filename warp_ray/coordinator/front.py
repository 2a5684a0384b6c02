"""The LITI front (WARP, Figure 4): (1 - eta) * base + eta * slerp for several eta, evaluated on
held-out prompts, drawn with the learners' training trajectories on the same (KL, reward) axes."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402


def plot_front(front: Sequence[dict], trajectories: Sequence[Sequence[dict]], path: Path, title: str) -> None:
    """Reward against KL to the SFT: one line per front base, one per learner's evaluations, and
    the control reward likewise (dashed) when there is one. Better is up and to the left."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for m, history in enumerate(trajectories):
        evals = [h for h in history if "eval_kl_to_sft" in h]
        ax.plot(
            [h["eval_kl_to_sft"] for h in evals],
            [h["eval_reward"] for h in evals],
            "o-",
            alpha=0.5,
            ms=3,
            label=f"policy {m} (training)",
        )
    for towards in dict.fromkeys(p["towards"] for p in front):
        points = [p for p in front if p["towards"] == towards]
        (line,) = ax.plot(
            [p["kl_to_sft"] for p in points], [p["reward"] for p in points], "s-", label=f"LITI towards {towards}"
        )
        for p in points:
            ax.annotate(
                f"{p['eta']:g}", (p["kl_to_sft"], p["reward"]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        if "control_reward" in points[0]:
            ax.plot(
                [p["kl_to_sft"] for p in points],
                [p["control_reward"] for p in points],
                "s--",
                color=line.get_color(),
                alpha=0.6,
                label=f"LITI towards {towards}, control reward",
            )
    ax.set(xlabel="KL to the SFT policy (nats)", ylabel="reward (held-out prompts)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(front: Sequence[dict], final_metrics: Sequence[dict], iteration: int) -> str:
    """Markdown: the iteration's LITI front and where its learners ended."""
    control = "control_reward" in front[0]
    lines = [
        f"## Iteration {iteration}",
        "",
        "LITI front (held-out prompts):",
        "",
        "| towards | eta | KL to SFT | reward |" + (" control reward |" if control else ""),
        "|---|---|---|---|" + ("---|" if control else ""),
    ]
    for p in front:
        lines.append(
            f"| {p['towards']} | {p['eta']:g} | {p['kl_to_sft']:.3f} | {p['reward']:.3f} |"
            + (f" {p['control_reward']:.3f} |" if control else "")
        )
    lines += [
        "",
        "Learners after their last step:",
        "",
        "| policy | train reward | KL to anchor | eval reward | eval KL to SFT |",
        "|---|---|---|---|---|",
    ]
    for m, last in enumerate(final_metrics):
        lines.append(
            f"| {m} | {last['reward']:.3f} | {last['kl_to_anchor']:.3f} | {last.get('eval_reward', float('nan')):.3f} "
            f"| {last.get('eval_kl_to_sft', float('nan')):.3f} |"
        )
    return "\n".join(lines) + "\n"
