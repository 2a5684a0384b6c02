"""The LITI front (WARP, Figure 4): (1 - eta) * base + eta * slerp for several eta, evaluated on
held-out prompts, drawn with the learners' training trajectories on the same (KL, reward) axes,
a panel for each reward."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

REWARDS = {"reward": "proxy reward", "control_reward": "control reward"}


def plot_front(
    front: Sequence[dict], trajectories: Sequence[Sequence[dict]], policies: Sequence[int], path: Path, title: str
) -> None:
    fig = front_figure(front, trajectories, policies, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def front_figure(
    front: Sequence[dict], trajectories: Sequence[Sequence[dict]], policies: Sequence[int], title: str
) -> Figure:
    """Reward against KL to the SFT, the proxy reward in one panel and the control reward (when
    there is one) in another, their scales being unrelated: in each, one line per front base
    (annotated with eta) and each learner's training run as a curve through its evaluations.
    Better is up and to the left."""
    keys = [k for k in REWARDS if k in front[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(6.5 * len(keys), 5), squeeze=False)
    for key, ax in zip(keys, axes[0]):
        for m, history in zip(policies, trajectories):
            evals = [h for h in history if f"eval_{key}" in h]
            x, y = [h["eval_kl_to_sft"] for h in evals], [h[f"eval_{key}"] for h in evals]
            ax.plot(x, y, "o-", alpha=0.5, ms=3, label=f"policy {m} (training)")
        for towards in dict.fromkeys(p["towards"] for p in front):
            points = [p for p in front if p["towards"] == towards]
            ax.plot([p["kl_to_sft"] for p in points], [p[key] for p in points], "s-", label=f"LITI towards {towards}")
            for p in points:
                ax.annotate(
                    f"{p['eta']:g}", (p["kl_to_sft"], p[key]), fontsize=7, xytext=(3, 3), textcoords="offset points"
                )
        ax.set(xlabel="KL to the SFT policy (nats)", ylabel=f"{REWARDS[key]} (held-out prompts)", title=REWARDS[key])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def report(front: Sequence[dict], final_metrics: Sequence[dict], policies: Sequence[int], iteration: int) -> str:
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
    for m, last in zip(policies, final_metrics):
        lines.append(
            f"| {m} | {last['reward']:.3f} | {last['kl_to_anchor']:.3f} | {last.get('eval_reward', float('nan')):.3f} "
            f"| {last.get('eval_kl_to_sft', float('nan')):.3f} |"
        )
    return "\n".join(lines) + "\n"
