"""The measurements behind the papers' claims, on the built-in task: everything one
`warp-ray reproduce` runs, written to one JSON file that the claims and figures are read from.

1. WARM (M reward models, weight averaged) and its accuracy table; the single RM with the best
   validation accuracy is the baseline of claim 7.
2. WARP, Algorithm 1, by the coordinator (`warp-ray warp` with paths.keep_policies): M = 4
   policies per iteration, I iterations, the LITI fronts. Its iteration-0 policy 0 is also the
   "EMA anchor, beta 0.1" REINFORCE run.
3. REINFORCE baselines from the SFT, with the same seed (so the same prompts) and T steps each:
   the anchors and betas of claim 1, and a run against the single RM (claim 7).
4. Merges of the saved policies (SLERP against LERP, M = 2 against M = 4), a WARP policy
   matched in KL to the REINFORCE one (claim 8), evaluated on the baselines' engines; the task
   vectors' angles.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import ray
import torch

from warp_ray.checkpoint import load_model_weights
from warp_ray.config import WarpConfig
from warp_ray.coordinator.checkpoints import iteration_dir
from warp_ray.coordinator.coordinator import run_warp
from warp_ray.coordinator.learners import RemoteLearner, run_seed
from warp_ray.data import read_prompts
from warp_ray.errors import ConfigError
from warp_ray.evaluation import Evaluator, ReferencePolicy
from warp_ray.merge import average, liti, slerp, task_vector_grams
from warp_ray.reward.server import RewardServer
from warp_ray.reward.warm import run_warm
from warp_ray.task.build import task_inputs

log = logging.getLogger(__name__)

# REINFORCE runs besides WARP's own: name -> (anchor, beta, reward trained against), run
# RUNS_AT_ONCE at a time; the last ones train against WARM, and their engines then evaluate the merges.
BASELINES = {
    "EMA anchor, beta 0.01": ("ema", 0.01, "warm"),
    "SFT anchor, beta 0": ("sft", 0.0, "warm"),
    "SFT anchor, beta 0.01, single RM": ("sft", 0.01, "single"),
    "SFT anchor, beta 0.01": ("sft", 0.01, "warm"),
    "SFT anchor, beta 0.1": ("sft", 0.1, "warm"),
}
RUNS_AT_ONCE = 3  # a learner holds about 3 GB here (its rank, its vLLM engine and KV cache): 5 at once ran out of 24 GB
WARP_RUN = "EMA anchor, beta 0.1"  # WARP's iteration-0 policy 0: the same run, already made
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
MATCHED_KL = 0.1  # claim 8: the WARP policy's KL within 10% of the REINFORCE policy's
PROTOCOL = {"warp.M": 4, "warp.anchor": "ema", "warp.beta": 0.1, "warp.proxy_reward": "warm", "paths.keep_policies": True}


def check_protocol(config: WarpConfig) -> None:
    """The claims name these settings (M = 4 against M = 2, the EMA anchor at beta 0.1, WARM)."""
    for key, wanted in PROTOCOL.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value != wanted:
            raise ConfigError(f"reproduce needs {key} = {wanted!r} (the claims are about it), got {value!r}; see configs/reproduce.yaml")
    if config.warp.I < 2:
        raise ConfigError(f"reproduce needs warp.I >= 2 (claim 6 compares iterations 1 and 2), got {config.warp.I}")
    if config.paths.sft_model is not None:
        raise ConfigError("reproduce runs on the built-in task (its gold reward is the control reward); unset paths.sft_model")


def measure(config: WarpConfig) -> dict:
    """Run everything; returns the results, every number the claims and figures need."""
    check_protocol(config)
    out, seconds = config.paths.output_dir, {}
    start = time.perf_counter()
    sft, prompts, preferences, _ = task_inputs(config)
    accuracy_file = out / "rm" / "accuracy.json"
    accuracy = json.loads(accuracy_file.read_text()) if accuracy_file.is_file() else run_warm(config)
    seconds["task and WARM"] = time.perf_counter() - start
    single = max((name for name in accuracy if name.startswith("RM ")), key=lambda name: accuracy[name]["validation"])

    run_warp(config, resume=True)  # continues a run cut short; a finished one is read back
    seconds["WARP"] = time.perf_counter() - start - sum(seconds.values())
    warp = [_iteration(out, i) for i in range(config.warp.I)]

    log.info("REINFORCE baselines: %d runs of %d steps from the SFT", len(BASELINES), config.warp.T)
    evaluators = _evaluators(config, sft, prompts, out / "rm", single)
    runs, finals, learners, names = {WARP_RUN: warp[0]["trajectories"][0]}, {}, {}, list(BASELINES)
    for wave in (names[k : k + RUNS_AT_ONCE] for k in range(0, len(names), RUNS_AT_ONCE)):
        for learner in learners.values():
            ray.get(learner.close.remote())
        learners = {name: RemoteLearner.remote(_variant(config, *BASELINES[name][:2]), str(sft), read_prompts(prompts / "train.jsonl"),
                                               evaluators[BASELINES[name][2]].reward_server, seed=run_seed(config.warp.seed, 0, 0),
                                               evaluator=evaluators[BASELINES[name][2]])
                    for name in wave}
        logs = {name: out / "reproduce" / "logs" / name.replace(",", "").replace(" ", "_") for name in wave}
        histories = ray.get([learner.run.remote(config.warp.T, logs[name], desc=name) for name, learner in learners.items()])
        runs.update({name: _evaluations(history) for name, history in zip(learners, histories)})
        finals.update(zip(learners, ray.get([learner.get_weights.remote() for learner in learners.values()])))
    seconds["REINFORCE baselines"] = time.perf_counter() - start - sum(seconds.values())

    log.info("merges of the saved policies, evaluated")
    engines = [learner for name, learner in learners.items() if BASELINES[name][2] == "warm"]  # the last wave's, against WARM
    sft_weights = load_model_weights(sft)
    policies = [load_model_weights(p) for p in sorted((iteration_dir(out, 0) / "policies").iterdir())]
    results = {
        "seconds": seconds,
        "config": config.model_dump(mode="json"),
        "warm": {"accuracy": accuracy, "single_rm": single, "pairs": _pair_counts(preferences)},
        "runs": runs,
        "warp": warp,
        "angles": angles(sft_weights, policies),
        "interpolation": _interpolation(engines, sft_weights, policies[:2]),
        "front_two_policies": _front(engines, sft_weights, slerp(sft_weights, policies[:2]), config.evaluation.front_etas),
        "win_rate": _matched_kl(engines, config, out, sft_weights, finals["SFT anchor, beta 0.1"]),
    }
    seconds["merges and evaluations"] = time.perf_counter() - start - sum(seconds.values())
    for learner in learners.values():
        ray.get(learner.close.remote())
    return results


def _variant(config: WarpConfig, anchor: str, beta: float) -> WarpConfig:
    return config.model_copy(update={"warp": config.warp.model_copy(update={"anchor": anchor, "beta": beta})})


def _evaluators(config: WarpConfig, sft: Path, prompts: Path, rm: Path, single: str) -> dict[str, Evaluator]:
    """The held-out evaluators of the runs against WARM and against the single RM, sharing the SFT
    reference and the gold (control) reward."""
    trust = config.paths.trust_remote_code
    reference, gold, held_out = ReferencePolicy.remote(str(sft), trust_remote_code=trust), RewardServer.remote("gold"), read_prompts(prompts / "held_out.jsonl")
    folders = {"warm": rm / "warm", "single": rm / f"rm_{int(single.removeprefix('RM ')) - 1}"}
    return {reward: Evaluator(config, held_out, RewardServer.remote("model", [str(folder)], params=config.reward_server, trust_remote_code=trust),
                                  reference, gold)
            for reward, folder in folders.items()}


def _evaluations(history: list[dict]) -> list[dict]:
    """A run's held-out evaluations: step, reward, kl_to_sft, control_reward."""
    return [{"step": h["step"], **{k.removeprefix("eval_"): v for k, v in h.items() if k.startswith("eval_")}}
            for h in history if "eval_reward" in h]


def _iteration(out: Path, i: int) -> dict:
    folder = iteration_dir(out, i)
    trajectories = json.loads((folder / "trajectories.json").read_text())
    return {"front": json.loads((folder / "front.json").read_text()), "trajectories": [_evaluations(h) for h in trajectories]}


def _pair_counts(preferences: Path) -> dict[str, int]:
    return {split.stem: sum(1 for line in split.open() if line.strip()) for split in sorted(preferences.glob("*.jsonl"))}


def angles(init: dict[str, torch.Tensor], policies: list[dict[str, torch.Tensor]]) -> dict:
    """Per tensor and per pair of policies: the angle between their task vectors (degrees), their
    norm ratio, and the cosine between their whole weights."""
    deltas = task_vector_grams(init, policies)
    weights = task_vector_grams({k: torch.zeros_like(v) for k, v in init.items()}, policies)
    pairs = [(i, j) for i in range(len(policies)) for j in range(i + 1, len(policies))]

    def cosine(g: torch.Tensor, i: int, j: int) -> float:
        return float(g[i, j] / (g[i, i] * g[j, j]).sqrt())

    rows = {}
    for name, g in deltas.items():
        if (g.diagonal() > 0).all():  # a tensor no policy moved has no angle
            rows[name] = {"task_vector_degrees": [math.degrees(math.acos(min(1.0, max(-1.0, cosine(g, i, j))))) for i, j in pairs],
                          "norm_ratio": [float((g[i, i] / g[j, j]).sqrt()) for i, j in pairs],
                          "weight_cosine": [cosine(weights[name], i, j) for i, j in pairs]}
    return {"pairs": pairs, "tensors": rows}


def _evaluate(engines: list, weights: list[dict[str, torch.Tensor]]) -> list[dict]:
    """Held-out evaluations of several weights at once, spread over the engines: the mean and the
    standard error of each measure, and the per-sample control rewards (for win rates)."""
    rows = ray.get([engines[k % len(engines)].evaluate_weights.remote([ray.put(w)], per_sample=True) for k, w in enumerate(weights)])
    return [_summary(r) for r in rows]


def _summary(rows: list[dict]) -> dict:
    summary = {}
    for key in ("reward", "kl_to_sft", "control_reward"):
        values = np.array([r[key] for r in rows])
        summary[key], summary[f"{key}_se"] = float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))
    summary["control_rewards"] = [r["control_reward"] for r in rows]
    return summary


def _interpolation(engines: list, init: dict, pair: list[dict]) -> dict:
    """Claim 2: SLERP and LERP of two policies' task vectors for each lambda (0 and 1: the policies)."""
    inner = [lam for lam in LAMBDAS if 0 < lam < 1]
    weights = [*pair, *(slerp(init, pair, (1 - lam, lam)) for lam in inner), *(average(pair, (1 - lam, lam)) for lam in inner)]
    first, second, *merged = _evaluate(engines, weights)
    return {"lambda": list(LAMBDAS), "slerp": [first, *merged[: len(inner)], second], "lerp": [first, *merged[len(inner):], second]}


def _front(engines: list, base: dict, merged: dict, etas: list[float]) -> list[dict]:
    """LITI points (1 - eta) * base + eta * merged, evaluated."""
    return [{"eta": eta, **point} for eta, point in zip(etas, _evaluate(engines, [liti(base, merged, eta) for eta in etas]))]


def _matched_kl(engines: list, config: WarpConfig, out: Path, sft: dict, reinforce: dict) -> dict:
    """Claim 8: the REINFORCE (SFT anchor) policy against the final WARP front's point at the same
    KL: eta found on the last iteration's front towards the SFT, then refined by the secant method."""
    last = config.warp.I - 1
    init = load_model_weights(iteration_dir(out, last - 1) / "model")
    merged = slerp(init, [load_model_weights(p) for p in sorted((iteration_dir(out, last) / "policies").iterdir())])
    baseline, = _evaluate(engines, [reinforce])
    front = sorted((p for p in json.loads((iteration_dir(out, last) / "front.json").read_text()) if p["towards"] == "sft"),
                   key=lambda p: p["kl_to_sft"])
    tried = [(p["eta"], p["kl_to_sft"]) for p in front]
    target = baseline["kl_to_sft"]
    for _ in range(3):
        below = max((t for t in tried if t[1] <= target), key=lambda t: t[1], default=tried[0])
        above = min((t for t in tried if t[1] > target), key=lambda t: t[1], default=tried[-1])
        eta = below[0] if above == below else below[0] + (target - below[1]) * (above[0] - below[0]) / (above[1] - below[1])
        eta = float(min(1.0, max(0.0, eta)))
        point, = _evaluate(engines, [liti(sft, merged, eta)])
        tried.append((eta, point["kl_to_sft"]))
        if abs(point["kl_to_sft"] - target) <= MATCHED_KL * target:
            break
    return {"warp": {"eta": eta, **point}, "reinforce": baseline}
