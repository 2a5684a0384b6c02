"""The measurements behind the papers' claims, on the built-in task: everything one
`warp-ray reproduce` runs, written to one JSON file that the claims and figures are read from.

1. The task and WARM (M reward models, weight averaged) and its accuracy table, once: the seeds
   share them. The single RM with the best validation accuracy is the baseline of claim 7.
Then, for each seed of reproduce.seeds (warp.seed = that seed, a folder of its own):
2. WARP, Algorithm 1, by the coordinator (`warp-ray warp` with paths.keep_policies): M = 4
   policies per iteration, I iterations, the LITI fronts. Its iteration-0 policy 0 is also the
   "EMA anchor, beta 0.1" REINFORCE run.
Then, evaluated against one SFT reference and one gold-reward server:
3. The regime (regime.py), whose RL run against that RM is claim 7's baseline, "SFT anchor,
   beta 0.01, single RM".
4. REINFORCE baselines from the SFT, with the same seed (so the same prompts) and T steps each:
   the anchors and betas of claim 1. A wave of runs after the first takes the first wave's
   learners, each run starting afresh (`Learner.set_weights` with the run's settings).
5. Merges of the saved policies (SLERP against LERP, M = 2 against M = 4), a WARP policy
   matched in KL to the REINFORCE one (claim 8), evaluated on the baselines' engines; the task
   vectors' angles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple, Optional

import ray
import torch

from warp_ray.checkpoint import load_model_weights, write_atomic
from warp_ray.config import WarpConfig
from warp_ray.coordinator.checkpoints import iteration_dir
from warp_ray.coordinator.learners import run_seed, start_learner
from warp_ray.data import read_preferences, read_prompts
from warp_ray.driver import run_warm, run_warp
from warp_ray.errors import ConfigError, WarpRayError
from warp_ray.evaluation import Evaluator, start_reference, summarise
from warp_ray.learner.learner import evaluations
from warp_ray.merge import average, liti, slerp, task_vector_grams
from warp_ray.reproduce import regime
from warp_ray.reward.server import RewardServer, RewardSource, start_reward_server
from warp_ray.reward.warm import best_single, is_trained_on
from warp_ray.runtime import init_ray
from warp_ray.task import world
from warp_ray.task.build import task_inputs
from warp_ray.timing import Laps

log = logging.getLogger(__name__)


class Variant(NamedTuple):
    """A REINFORCE run's anchor and KL coefficient, the rest of the config as WARP's."""

    anchor: str
    beta: float


# REINFORCE runs against WARM besides WARP's own, run RUNS_AT_ONCE at a time on the same learners,
# whose engines then evaluate the merges.
BASELINES = {
    "EMA anchor, beta 0.01": Variant("ema", 0.01),
    "SFT anchor, beta 0": Variant("sft", 0.0),
    "SFT anchor, beta 0.01": Variant("sft", 0.01),
    "SFT anchor, beta 0.1": Variant("sft", 0.1),
}
SINGLE_RM_RUN = "SFT anchor, beta 0.01, single RM"  # the regime's run
RUNS_AT_ONCE = 3  # a learner holds about 3 GB here (its rank, its vLLM engine and KV cache): 5 at once ran out of 24 GB
WARP_RUN = "EMA anchor, beta 0.1"  # WARP's iteration-0 policy 0: the same run, already made
LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)
MATCHED_KL = 0.1  # claim 8: the WARP policy's KL within 10% of the REINFORCE policy's
PROTOCOL = {
    "warp.M": 4,
    "warp.anchor": "ema",
    "warp.beta": 0.1,
    "warp.proxy_reward": "warm",
    "paths.keep_policies": True,
}


def check_protocol(config: WarpConfig) -> None:
    """The claims name these settings (M = 4 against M = 2, the EMA anchor at beta 0.1, WARM)."""
    for key, wanted in PROTOCOL.items():
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value != wanted:
            raise ConfigError(
                f"reproduce needs {key} = {wanted!r} (the claims are about it), got {value!r}; see "
                "configs/reproduce.yaml"
            )
    if config.warp.I < 2:
        raise ConfigError(f"reproduce needs warp.I >= 2 (claim 6 compares iterations 1 and 2), got {config.warp.I}")
    if config.evaluation.prompts < 2:
        raise ConfigError(
            f"reproduce needs evaluation.prompts >= 2 (its noise is the spread between prompts), "
            f"got {config.evaluation.prompts}"
        )
    if config.evaluation.every != config.warp.T // 10:
        raise ConfigError(
            f"reproduce needs evaluation.every = warp.T / 10 = {config.warp.T // 10} (every run is "
            f"evaluated on the regime's grid), got {config.evaluation.every}"
        )
    if config.paths.sft_model is not None:
        raise ConfigError(
            "reproduce runs on the built-in task (its gold reward is the control reward); unset paths.sft_model"
        )


def measure(config: WarpConfig) -> dict:
    """Run everything: the task and WARM once, then each seed of reproduce.seeds (`measure_seed`,
    read back where it was measured already); returns the results, every number the claims and
    figures need."""
    check_protocol(config)
    start = time.perf_counter()
    _, _, preferences, accuracy, trained = _task_and_warm(config)
    seconds = {"task and WARM": time.perf_counter() - start}
    by_seed, read_back = [], ([] if trained else ["task and WARM"])
    for seed in config.reproduce.seeds:
        results, fresh = _seed_results(seed_config(config, seed))
        by_seed.append(results)
        if not fresh:
            read_back.append(f"seed {seed}")
        seconds[f"seed {seed}"] = sum(results["seconds"].values())  # the seed's own work, also when read back
    return {
        "seconds": seconds,
        "read_back": read_back,
        "config": config.model_dump(mode="json"),
        "warm": {
            "accuracy": accuracy,
            "single_rm": by_seed[0]["regime"]["best_single_rm"]["name"],
            "pairs": _pair_counts(preferences),
        },
        "by_seed": by_seed,
    }


SEED_INPUTS, SEED_RESULTS = "inputs.json", "results.json"
"""In a seed's folder: what it is measured with (its settings and reward models), and its results."""


def seed_config(config: WarpConfig, seed: int) -> WarpConfig:
    """One seed's settings: warp.seed, and a folder of its own (<output_dir>/seeds/seed_<seed>) whose
    task and reward models are links to the shared ones, so that they are built and trained once."""
    folder = config.paths.output_dir / "seeds" / f"seed_{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for shared in ("task", "rm"):
        link, target = folder / shared, Path("..", "..", shared)
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.exists() or link.is_symlink():
            raise WarpRayError(
                f"{link} should link to the shared {config.paths.output_dir / shared} (seeds share the task and "
                "WARM); move it away and run again"
            )
        link.symlink_to(target, target_is_directory=True)
    return config.model_copy(
        update={
            "warp": config.warp.model_copy(update={"seed": seed}),
            "paths": config.paths.model_copy(update={"output_dir": folder}),
        }
    )


def _seed_results(config: WarpConfig) -> tuple[dict, bool]:
    """A seed's results, and whether they were measured now: read back when measured with the same
    settings against the same reward models; otherwise measured, resuming WARP only from iterations
    made with both (a seed folder made with anything else is emptied first)."""
    folder = config.paths.output_dir
    inputs = {
        # Which seeds run, the bootstrap and where the folder is named change no seed's measurements.
        "config": config.model_dump(mode="json", exclude={"reproduce": True, "paths": {"output_dir"}}),
        "warm": _fingerprint(folder / "rm" / "warm"),
        "world": world.FINGERPRINT,  # the gold reward may change where the reward models do not
    }
    record, saved = folder / SEED_INPUTS, folder / SEED_RESULTS
    if record.is_file() and json.loads(record.read_text()) == inputs:
        if saved.is_file():
            return json.loads(saved.read_text()), False
    else:
        for entry in folder.iterdir():
            if entry.is_symlink() or entry.is_file():
                if entry.name not in ("task", "rm"):
                    entry.unlink()
            else:
                shutil.rmtree(entry)
        record.write_text(json.dumps(inputs))
    results = measure_seed(config)
    write_atomic(saved, json.dumps(results))
    return results, True


def _fingerprint(folder: Path) -> str:
    """Of the weights in a model folder: reward models trained again may differ (another `warm.seed`, GPU kernels)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WarpRayError(f"{folder} holds no safetensors weights: WARM is missing or incomplete")
    digest = hashlib.sha256()
    for weights in files:
        digest.update(weights.read_bytes())
    return digest.hexdigest()


def measure_seed(config: WarpConfig) -> dict:
    """One seed's measurements: WARP (resumed where a run was cut short), the regime's run (claim
    7's single-RM baseline), the REINFORCE baselines and the merges."""
    out = config.paths.output_dir
    seconds = Laps()
    sft, prompts, _, _ = task_inputs(config)
    run_warp(config, resume=True)
    seconds("WARP")
    warp = [_iteration(out, i) for i in range(config.warp.I)]
    services = Services.start(config, sft)  # after WARP, which has its own: not idle beside its learners
    measured_regime = measure_regime(config, services)
    seconds("regime")
    evaluator = _evaluator(config, prompts, out / "rm" / "warm", services)
    baselines, finals, engines = _reinforce_baselines(config, sft, prompts, evaluator)
    runs = {WARP_RUN: warp[0]["trajectories"][0], SINGLE_RM_RUN: measured_regime["run"], **baselines}
    seconds("REINFORCE baselines")

    log.info("seed %d: merges of the saved policies, evaluated", config.warp.seed)
    sft_weights = load_model_weights(sft)
    # in learner order, as the coordinator merged them: policy_10 after policy_9
    policy_folders = sorted(
        (iteration_dir(out, 0) / "policies").glob("policy_*"), key=lambda p: int(p.name.removeprefix("policy_"))
    )
    policies = [load_model_weights(p) for p in policy_folders]
    results = {
        "seed": config.warp.seed,
        "seconds": seconds,
        "regime": measured_regime,
        "runs": runs,
        "warp": warp,
        "angles": angles(sft_weights, policies),
        "interpolation": _interpolation(engines, sft_weights, policies[:2]),
        "front_two_policies": _front(
            engines, sft_weights, slerp(sft_weights, policies[:2]), config.evaluation.front_etas
        ),
        "win_rate": _matched_kl(engines, config, out, sft_weights, finals["SFT anchor, beta 0.1"]),
    }
    seconds("merges and evaluations")
    for learner in engines:
        ray.kill(learner)  # and its ranks and engines, or the ones it hosts
    return results


def _reinforce_baselines(
    config: WarpConfig, sft: Path, prompts: Path, evaluator: Evaluator
) -> tuple[dict[str, list[dict]], dict[str, dict], list[ray.actor.ActorHandle]]:
    """The REINFORCE baselines, in equal waves of at most RUNS_AT_ONCE, each wave on the first
    wave's learners (each run from the SFT with its own anchor and beta): their evaluations, their
    final weights, and the learners, left open (their engines evaluate the merges)."""
    out = config.paths.output_dir
    log.info(
        "seed %d: %d REINFORCE baselines of %d steps from the SFT", config.warp.seed, len(BASELINES), config.warp.T
    )
    names, runs_config = list(BASELINES), {name: _variant(config, variant) for name, variant in BASELINES.items()}
    per_wave = math.ceil(len(names) / math.ceil(len(names) / RUNS_AT_ONCE))
    train = read_prompts(prompts / "train.jsonl")
    seed = run_seed(config.warp.seed, 0, 0)
    learners = [
        start_learner(runs_config[name], sft, train, evaluator.reward_server, seed, evaluator)
        for name in names[:per_wave]
    ]
    runs, finals = {}, {}
    for first in range(0, len(names), per_wave):
        wave = dict(zip(names[first : first + per_wave], learners))
        if first:  # the first wave's runs started with their learners
            ray.get([learner.set_weights.remote(None, seed, runs_config[n].warp) for n, learner in wave.items()])
        logs = {name: out / "reproduce" / "logs" / name.replace(",", "").replace(" ", "_") for name in wave}
        histories = ray.get(
            [learner.run.remote(config.warp.T, logs[name], desc=name) for name, learner in wave.items()]
        )
        runs.update({name: evaluations(history) for name, history in zip(wave, histories)})
        finals.update(zip(wave, ray.get([learner.get_weights.remote() for learner in wave.values()])))
    return runs, finals, learners


def _task_and_warm(config: WarpConfig) -> tuple[Path, Path, Path, dict, bool]:
    """The task's SFT, prompts and preferences folders, WARM's accuracy table, and whether WARM was
    trained now: it is read back when trained on the same task with the same settings."""
    sft, prompts, preferences, _ = task_inputs(config)
    if is_trained_on(config, sft, preferences):
        return (
            sft,
            prompts,
            preferences,
            json.loads((config.paths.output_dir / "rm" / "accuracy.json").read_text()),
            False,
        )
    return sft, prompts, preferences, run_warm(config), True


def measure_regime(config: WarpConfig, services: Optional[Services] = None) -> dict:
    """The regime's numbers: the task and WARM as `warp-ray reproduce` builds them (reused when
    built), the label ceiling, the best single RM, and one RL run against it from the SFT (SFT
    anchor, beta 0.01) evaluated before its first step and every T / 10 steps. `services`: the
    seed's, else started here."""
    warp, out = config.warp, config.paths.output_dir
    sft, prompts, preferences, accuracy, _ = _task_and_warm(config)
    init_ray()  # WARM read back started no cluster
    single, folder = best_single(accuracy, out / "rm")
    run_config = _variant(config, Variant("sft", regime.BETA))
    evaluator = _evaluator(run_config, prompts, folder, services or Services.start(config, sft))
    learner = start_learner(
        run_config,
        sft,
        read_prompts(prompts / "train.jsonl"),
        evaluator.reward_server,
        run_seed(warp.seed, 0, 0),
        evaluator,
    )
    start = ray.get(learner.evaluate.remote())
    log_dir = out / "reproduce" / "logs" / "regime"
    history = ray.get(learner.run.remote(warp.T, log_dir, desc=f"regime: SFT anchor, beta {regime.BETA}, {single}"))
    ray.kill(learner)
    return {
        "T": warp.T,
        "mu": warp.mu,
        "sft": start,
        "run": evaluations(history),
        "best_gold_reward": world.BEST_GOLD_REWARD,
        "label_ceiling": regime.label_ceiling(read_preferences(preferences / "validation.jsonl")),
        "best_single_rm": {"name": single, "accuracy": accuracy[single]["validation"]},
        "rms": {name: row["validation"] for name, row in accuracy.items()},
    }


def _variant(config: WarpConfig, variant: Variant) -> WarpConfig:
    return config.model_copy(update={"warp": config.warp.model_copy(update=variant._asdict())})


class Services(NamedTuple):
    """The SFT reference and the gold reward's server: a seed's regime run, REINFORCE baselines and
    merges are evaluated against them, each run's reward model aside."""

    reference: ray.actor.ActorHandle
    gold: ray.actor.ActorHandle

    @classmethod
    def start(cls, config: WarpConfig, sft: Path) -> "Services":
        return cls(start_reference(sft, config), RewardServer.remote(RewardSource(function=world.gold_reward)))


def _evaluator(config: WarpConfig, prompts: Path, reward_model: Path, services: Services) -> Evaluator:
    """The held-out evaluator of runs against a reward model folder (WARM, or the regime's single RM):
    its reward server, the SFT reference, the gold reward."""
    trust = config.paths.trust_remote_code
    return Evaluator(
        config,
        read_prompts(prompts / "held_out.jsonl"),
        start_reward_server(RewardSource(folders=(str(reward_model),)), config.reward_server, trust),
        services.reference,
        services.gold,
    )


def _iteration(out: Path, i: int) -> dict:
    folder = iteration_dir(out, i)
    trajectories = json.loads((folder / "trajectories.json").read_text())
    front = json.loads((folder / "front.json").read_text())
    return {"front": front, "trajectories": [evaluations(h) for h in trajectories]}


def _pair_counts(preferences: Path) -> dict[str, int]:
    return {
        split.stem: sum(1 for line in split.open() if line.strip()) for split in sorted(preferences.glob("*.jsonl"))
    }


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
            rows[name] = {
                "task_vector_degrees": [
                    math.degrees(math.acos(min(1.0, max(-1.0, cosine(g, i, j))))) for i, j in pairs
                ],
                "norm_ratio": [float((g[i, i] / g[j, j]).sqrt()) for i, j in pairs],
                "weight_cosine": [cosine(weights[name], i, j) for i, j in pairs],
            }
    return {"pairs": pairs, "tensors": rows}


def _evaluate(engines: list, weights: list[dict[str, torch.Tensor]]) -> list[dict]:
    """Held-out evaluations of several weights at once, spread over the engines: the mean and the
    standard error of each measure, and the per-sample control rewards (for win rates)."""
    rows = ray.get(
        [
            engines[k % len(engines)].evaluate_weights.remote([ray.put(w)], per_sample=True)
            for k, w in enumerate(weights)
        ]
    )
    return [_summary(r) for r in rows]


def _summary(rows: list[dict]) -> dict:
    return {
        **summarise(rows, ("reward", "kl_to_sft", "control_reward")),
        "control_rewards": [r["control_reward"] for r in rows],
    }


def _interpolation(engines: list, init: dict, pair: list[dict]) -> dict:
    """Claim 2: SLERP and LERP of two policies' task vectors for each lambda (0 and 1: the policies)."""
    inner = [lam for lam in LAMBDAS if 0 < lam < 1]
    weights = [
        *pair,
        *(slerp(init, pair, (1 - lam, lam)) for lam in inner),
        *(average(pair, (1 - lam, lam)) for lam in inner),
    ]
    first, second, *merged = _evaluate(engines, weights)
    return {
        "lambda": list(LAMBDAS),
        "slerp": [first, *merged[: len(inner)], second],
        "lerp": [first, *merged[len(inner) :], second],
    }


def _front(engines: list, base: dict, merged: dict, etas: list[float]) -> list[dict]:
    """LITI points (1 - eta) * base + eta * merged, evaluated."""
    return [
        {"eta": eta, **point} for eta, point in zip(etas, _evaluate(engines, [liti(base, merged, eta) for eta in etas]))
    ]


def _matched_kl(engines: list, config: WarpConfig, out: Path, sft: dict, reinforce: dict) -> dict:
    """Claim 8: the REINFORCE (SFT anchor) policy against the final WARP front's point at the same
    KL: eta found on the last iteration's front towards the SFT, then refined by the secant method."""
    last = config.warp.I - 1
    init = load_model_weights(iteration_dir(out, last - 1) / "model")
    merged = slerp(init, [load_model_weights(p) for p in sorted((iteration_dir(out, last) / "policies").iterdir())])
    (baseline,) = _evaluate(engines, [reinforce])
    front = sorted(
        (p for p in json.loads((iteration_dir(out, last) / "front.json").read_text()) if p["towards"] == "sft"),
        key=lambda p: p["kl_to_sft"],
    )
    tried = [(p["eta"], p["kl_to_sft"]) for p in front]
    target = baseline["kl_to_sft"]
    for _ in range(3):
        below = max((t for t in tried if t[1] <= target), key=lambda t: t[1], default=tried[0])
        above = min((t for t in tried if t[1] > target), key=lambda t: t[1], default=tried[-1])
        eta = (
            below[0]
            if above == below
            else below[0] + (target - below[1]) * (above[0] - below[0]) / (above[1] - below[1])
        )
        eta = float(min(1.0, max(0.0, eta)))
        (point,) = _evaluate(engines, [liti(sft, merged, eta)])
        tried.append((eta, point["kl_to_sft"]))
        if abs(point["kl_to_sft"] - target) <= MATCHED_KL * target:
            break
    return {"warp": {"eta": eta, **point}, "reinforce": baseline}
