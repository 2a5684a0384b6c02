"""WARM: M reward models fine-tuned from one linear-probed start, as a Ray Tune sweep whose
trials are Ray Train runs, then averaged in weight space; and the accuracy table of each RM,
their ENS and their WARM (docs/algorithms.md#warm-weight-averaged-reward-models).

    <out>/probe/       SFT backbone + linear-probed head: the shared start
    <out>/start_<k>/   with warm.baklava: SFT checkpoint k's backbone + the same probed head
    <out>/train/rm_<m>/  Ray Train's run of fine-tune m: its checkpoints, the last one the HF folder
    <out>/rm_<m>/      the last checkpoint of fine-tune m (an HF folder)
    <out>/warm/        warp_ray.merge.average of the M fine-tunes: one RM, one forward pass
    <out>/accuracy.json, accuracy.md

The linear probe and the accuracy table run as Ray tasks on one worker's share of a trial's
resources, not in the driver; with several nodes, <out> must be a folder every node sees.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from typing import Sequence

import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from warp_ray.checkpoint import atomic_dir
from warp_ray.config import DataColumns, WarmParams, WarpConfig
from warp_ray.data import DEFAULT_COLUMNS, read_preferences
from warp_ray.errors import WarpRayError
from warp_ray.merge.folders import average_folders
from warp_ray.reward.fine_tune import TRIAL_CPUS, fine_tune, worker_threads
from warp_ray.reward.model import linear_probe, load_reward_model, pairwise_accuracy, score
from warp_ray.runtime import actor_device


def worker_share(params: WarmParams) -> dict:
    """Ray options of a task on one worker's share of a fine-tune's resources."""
    gpus = params.gpus_per_worker
    return {"num_cpus": params.cpus_per_worker, **({"num_gpus": gpus} if gpus else {})}


def save(model, tokenizer, folder: Path) -> None:
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def probed_starts(
    params: WarmParams,
    sft: str,
    train: str,
    columns: DataColumns,
    out: str,
    sft_checkpoints: Sequence[str],
    trust_remote_code: bool,
) -> list[str]:
    """The fine-tunes' starts: the SFT with the linear-probed head, and with warm.baklava the SFT
    checkpoints' backbones with the same head. Runs as a Ray task on one worker's share."""
    device = actor_device(params.gpus_per_worker, "WARM's linear probe")
    torch.set_num_threads(worker_threads(params))
    torch.manual_seed(params.seed)  # the score head is new, drawn from torch's generator as the model is built
    model, tokenizer = load_reward_model(sft, trust_remote_code=trust_remote_code)
    linear_probe(
        model.to(device), tokenizer, read_preferences(train, columns), params.linear_probe_steps, params.linear_probe_lr
    )
    save(model, tokenizer, Path(out) / "probe")
    starts = [Path(out) / "probe"]
    head = model.score.state_dict()
    for k, checkpoint in enumerate(sft_checkpoints if params.baklava else (), start=1):
        backbone, tokenizer = load_reward_model(checkpoint, trust_remote_code=trust_remote_code)
        backbone.score.load_state_dict(head)
        save(backbone, tokenizer, Path(out) / f"start_{k}")
        starts.append(Path(out) / f"start_{k}")
    return [str(s) for s in starts]


def held_at_once(cpus: float, gpus: float) -> int:
    """How many tasks of `cpus` CPUs and `gpus` GPUs the cluster holds at once (at least 1), counted
    now: WARM runs before anything else of warp-ray holds resources. An autoscaling cluster's nodes
    added later are not counted."""
    total = ray.cluster_resources()
    fits = [total.get("CPU", 0) // cpus] + ([total.get("GPU", 0) // gpus] if gpus else [])
    return max(1, math.floor(min(fits)))


def concurrent_trials(params: WarmParams) -> int:
    """Fine-tunes whose workers the cluster holds at once: Tune starts no more, so that no Ray Train
    run waits for workers behind another."""
    return min(params.M, held_at_once(params.cpus_per_trial, params.gpus_per_trial))


def scoring_shards(models: int, slots: int) -> list[tuple[int, int, int]]:
    """The accuracy table's Ray tasks, (model, shard, shards) each, for `slots` tasks at once: whole
    models in as many full waves as they fill, then, after at least one, each model left over cut into
    the most shards that the last wave holds. 5 models on 2 slots: 4 whole, then the fifth in halves,
    so that no slot idles through a third wave. A shard is a load of its model, so a slot loads at most
    one more than it would; fewer models than slots are not cut (a 7B reward model's load is not free)."""
    left = models % slots
    shards = slots // left if left and models > slots else 1
    whole = models - left
    return [(m, 0, 1) for m in range(whole)] + [(m, k, shards) for m in range(whole, models) for k in range(shards)]


def train_warm(
    params: WarmParams,
    sft: Path,
    preferences: dict[str, Path],
    out: Path,
    sft_checkpoints: Sequence[Path] = (),
    trust_remote_code: bool = False,
    columns: DataColumns = DEFAULT_COLUMNS,
    verbose: bool = True,
) -> list[Path]:
    """Linear probe, M fine-tunes as Ray Train runs in a Ray Tune sweep, WARM average. Returns the
    M fine-tune folders.

    Every fine-tune starts from the SFT backbone with the linear-probed head (<out>/probe); with
    params.baklava, fine-tune m takes its backbone from the m-th of (SFT, *sft_checkpoints)
    instead, still with the probed head (<out>/start_<k>). verbose: Ray Tune's trial table on the console.
    """
    if params.baklava and not sft_checkpoints:
        raise WarpRayError("warm.baklava needs SFT checkpoints (paths.sft_checkpoints, or the built-in task's)")
    out, sft = Path(out).resolve(), Path(sft).resolve()  # Ray Tune runs each trial in a folder of its own
    out.mkdir(parents=True, exist_ok=True)
    for runs in (out / "train", out / "tune"):  # a Ray Train run resumes from the checkpoints of its folder
        shutil.rmtree(runs, ignore_errors=True)
    train = str(Path(preferences["train"]).resolve())
    probe = ray.remote(probed_starts).options(**worker_share(params), max_retries=0)
    starts = ray.get(
        probe.remote(
            params,
            str(sft),
            train,
            columns,
            str(out),
            [str(Path(c).resolve()) for c in sft_checkpoints],
            trust_remote_code,
        )
    )
    trainable = tune.with_parameters(
        fine_tune,
        params=params,
        starts=starts,
        storage=str(out / "train"),
        train=train,
        columns=columns,
        trust_remote_code=trust_remote_code,
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": TRIAL_CPUS}),
        param_space={"m": tune.grid_search(list(range(params.M)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_trials(params)),
        run_config=tune.RunConfig(
            name="warm",
            storage_path=str(out / "tune"),
            # A lost trial (its node gone, with the Ray Train controller on it) starts again, from its run's checkpoint.
            failure_config=tune.FailureConfig(max_failures=params.max_failures),
            verbose=int(verbose),
        ),
    )
    with nullcontext() if verbose else redirect_stdout(io.StringIO()):  # Tune prints its header even when silent
        results = tuner.fit()
    errors = [r.error for r in results if r.error] + [
        r.metrics["failed"] for r in results if "failed" in (r.metrics or {})
    ]
    if errors:
        raise RuntimeError(f"{len(errors)} reward-model fine-tune(s) failed; the first: {errors[0]}")
    folders = []
    for result in sorted(results, key=lambda r: r.metrics["index"]):
        folder = out / f"rm_{result.metrics['index']}"
        with atomic_dir(folder, overwrite=True) as tmp:
            shutil.copytree(result.metrics[CHECKPOINT_PATH_KEY], tmp, dirs_exist_ok=True)
        folders.append(folder)
    average_folders(folders, out / "warm", overwrite=True, progress=False)
    return folders


def split_scores(
    folder: str,
    preferences: dict[str, str],
    columns: DataColumns,
    params: WarmParams,
    trust_remote_code: bool,
    shard: int = 0,
    shards: int = 1,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A reward model's r(x, y_chosen) and r(x, y_rejected) of every pair of every split (of every
    `shards`-th pair from `shard` on): a Ray task on one worker's share, scoring in batches."""
    torch.set_num_threads(worker_threads(params))
    device = actor_device(params.gpus_per_worker, "the accuracy table's scoring")
    model, tokenizer = load_reward_model(folder, trust_remote_code=trust_remote_code)
    model.to(device)
    by_split = {}
    for name, path in preferences.items():
        pairs = read_preferences(path, columns)[shard::shards]
        prompts = [p["prompt"] for p in pairs]
        by_split[name] = tuple(score(model, tokenizer, prompts, [p[k] for p in pairs]) for k in ("chosen", "rejected"))
    return by_split


def joined(shards: Sequence[dict[str, tuple[torch.Tensor, ...]]]) -> dict[str, tuple[torch.Tensor, ...]]:
    """One model's scores from `split_scores` of its shards, in order: shard k of n holds the pairs
    k, k + n, k + 2n, ... of every split."""

    def interleaved(parts: list[torch.Tensor]) -> torch.Tensor:
        whole = torch.empty(sum(len(p) for p in parts))
        for k, part in enumerate(parts):
            whole[k :: len(parts)] = part
        return whole

    return {name: tuple(interleaved([s[name][i] for s in shards]) for i in (0, 1)) for name in shards[0]}


def accuracy_table(
    folders: Sequence[Path],
    warm: Path,
    preferences: dict[str, Path],
    params: WarmParams,
    columns: DataColumns = DEFAULT_COLUMNS,
    trust_remote_code: bool = False,
) -> dict[str, dict[str, float]]:
    """Pairwise accuracy of each RM, of their prediction ensemble ENS and of WARM, on every split.

    "train (as labelled)" counts agreement with the training labels, flipped ones included;
    "train (true labels)" with the labels before the flips, where the data records them, and
    "flipped pairs (as labelled)" with the flipped labels alone: memorisation of the noise.
    Each model scores the pairs in Ray tasks on one worker's share of a fine-tune's resources, as
    many at once as the cluster holds (`scoring_shards`).
    """
    splits = {name: read_preferences(path, columns) for name, path in preferences.items()}
    paths = {name: str(Path(path).resolve()) for name, path in preferences.items()}
    task = ray.remote(split_scores).options(**worker_share(params))
    scored = [*folders, warm]
    tasks = scoring_shards(len(scored), held_at_once(params.cpus_per_worker, params.gpus_per_worker))
    results = ray.get(
        [task.remote(str(scored[m]), paths, columns, params, trust_remote_code, k, n) for m, k, n in tasks]
    )
    *singles, merged = [joined([r for (j, _, _), r in zip(tasks, results) if j == m]) for m in range(len(scored))]
    models = {f"RM {m + 1}": s for m, s in enumerate(singles)}
    models["ENS"] = {name: tuple(torch.stack([s[name][i] for s in singles]).mean(0) for i in (0, 1)) for name in splits}
    models["WARM"] = merged
    table = {}
    for model, by_split in models.items():
        row = {}
        for name, (chosen, rejected) in by_split.items():
            label = "train (as labelled)" if name == "train" else name
            row[label] = pairwise_accuracy(chosen, rejected)
            if name == "train" and all("flipped" in p for p in splits[name]):
                flipped = torch.tensor([p["flipped"] for p in splits[name]], dtype=torch.bool)
                row["train (true labels)"] = pairwise_accuracy(chosen, rejected, flipped.tolist())
                if flipped.any():  # how far the model memorised the corrupted labels
                    row["flipped pairs (as labelled)"] = pairwise_accuracy(chosen[flipped], rejected[flipped])
        table[model] = row
    return table


def best_single(table: dict[str, dict[str, float]], rm_dir: Path) -> tuple[str, Path]:
    """The single RM with the best validation accuracy in an accuracy table: its name and folder."""
    name = max((name for name in table if name.startswith("RM ")), key=lambda name: table[name]["validation"])
    return name, rm_dir / f"rm_{int(name.removeprefix('RM ')) - 1}"


def markdown(table: dict[str, dict[str, float]]) -> str:
    columns = list(next(iter(table.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {model} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |" for model, row in table.items()]
    return "\n".join(lines) + "\n"


RESOURCE_SETTINGS = {"cpus_per_trial", "gpus_per_trial", "checkpoint_every", "max_failures"}
"""WARM's settings that change where and how safely the reward models train, not what they are."""

TRAINED_ON = "trained_on.json"
"""Beside the reward models: what they were trained on (`trained_on`), written once they all are."""


def trained_on(config: WarpConfig, sft: Path, preferences: Path) -> dict:
    """What WARM is trained on: the built-in task's parameters (or the user's SFT and preference
    folders) and WARM's settings. Reward models trained on anything else are not these."""
    task = Path(sft).parent / "task.json"
    data = (
        json.loads(task.read_text())["params"]
        if task.is_file()
        else {"sft": str(sft), "preferences": str(preferences), "columns": config.data.model_dump()}
    )
    return {"task": data, "warm": config.warm.model_dump(mode="json", exclude=RESOURCE_SETTINGS)}


def is_trained_on(config: WarpConfig, sft: Path, preferences: Path) -> bool:
    """Whether <output_dir>/rm holds reward models trained on these inputs with these settings."""
    record = config.paths.output_dir / "rm" / TRAINED_ON
    return record.is_file() and json.loads(record.read_text()) == trained_on(config, sft, preferences)
