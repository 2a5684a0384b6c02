"""The front's figure: the proxy and the control reward in panels of their own, each learner's
training run a curve through its evaluations."""

from __future__ import annotations

import matplotlib.pyplot as plt

from warp_ray.coordinator.front import front_figure

FRONT = [
    {"towards": "init", "eta": eta, "kl_to_sft": kl, "reward": r, "control_reward": c}
    for eta, kl, r, c in ((0.0, 0.0, 0.1, -3.0), (0.5, 1.0, 0.4, -2.0), (1.0, 2.0, 0.6, -2.5))
]
RUN = [
    {"step": 1, "reward": 0.0},
    {"step": 2, "eval_kl_to_sft": 0.5, "eval_reward": 0.2, "eval_control_reward": -2.8},
    {"step": 3, "reward": 0.3},
    {"step": 4, "eval_kl_to_sft": 1.5, "eval_reward": 0.5, "eval_control_reward": -2.2},
]


def lines(ax) -> dict[str, list[tuple[float, float]]]:
    return {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in ax.get_lines()}


def test_each_reward_has_its_own_panel_with_the_front_and_the_training_curves():
    fig = front_figure(FRONT, [RUN], [3], "iteration 0")  # learner 3: its logs are policy_3
    proxy, control = fig.axes
    assert proxy.get_ylabel().startswith("proxy reward") and control.get_ylabel().startswith("control reward")
    assert lines(proxy)["LITI towards init"] == [(0.0, 0.1), (1.0, 0.4), (2.0, 0.6)]
    assert lines(control)["LITI towards init"] == [(0.0, -3.0), (1.0, -2.0), (2.0, -2.5)]
    assert lines(proxy)["policy 3 (training)"] == [(0.5, 0.2), (1.5, 0.5)]  # through its evaluations only
    assert lines(control)["policy 3 (training)"] == [(0.5, -2.8), (1.5, -2.2)]
    plt.close(fig)


def test_without_a_control_reward_there_is_one_panel():
    front = [{k: v for k, v in p.items() if k != "control_reward"} for p in FRONT]
    fig = front_figure(front, [RUN], [0], "iteration 0")
    assert len(fig.axes) == 1 and lines(fig.axes[0])["policy 0 (training)"] == [(0.5, 0.2), (1.5, 0.5)]
    plt.close(fig)
