"""WARM: M reward models fine-tuned from one linear-probed start, as Ray Tune trials, then
averaged in weight space; and the accuracy table of each RM, their ENS and their WARM
(docs/algorithms.md#warm-weight-averaged-reward-models).

    <out>/probe/       SFT backbone + linear-probed head: the shared start
    <out>/start_<k>/   with warm.baklava: SFT checkpoint k's backbone + the same probed head
    <out>/rm_<m>/      the last checkpoint of fine-tune m (an HF folder)
    <out>/warm/        warp_ray.merge.average of the M fine-tunes: one RM, one forward pass
    <out>/accuracy.json, accuracy.md
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from typing import Sequence

import torch
from ray import tune

from warp_ray.checkpoint import atomic_dir
from warp_ray.config import DataColumns, WarmParams, WarpConfig
from warp_ray.data import DEFAULT_COLUMNS, read_preferences
from warp_ray.errors import WarpRayError
from warp_ray.merge.folders import average_folders
from warp_ray.reward.model import linear_probe, load_reward_model, pairwise_accuracy, score, train_reward_model
from warp_ray.runtime import actor_device


def fine_tune(
    config: dict, params: WarmParams, starts: list[str], train: str, columns: DataColumns, trust_remote_code: bool
) -> None:
    """One Ray Tune trial: fine-tune a start with trial m's lr, dropout and data order."""
    trial = params.trial(config["m"])
    trial["start"] = starts[config["m"] % len(starts)]
    torch.set_num_threads(max(1, int(params.cpus_per_trial)))
    torch.manual_seed(trial["seed"])
    model, tokenizer = load_reward_model(trial["start"], dropout=trial["dropout"], trust_remote_code=trust_remote_code)
    model.to(actor_device(params.gpus_per_trial, f"WARM's fine-tune {config['m']}"))  # the GPUs Tune reserved
    losses = train_reward_model(
        model, tokenizer, read_preferences(train, columns), params.steps, trial["lr"], params.batch_size, trial["seed"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tune.report(
            {**trial, "loss": sum(losses[-20:]) / len(losses[-20:])}, checkpoint=tune.Checkpoint.from_directory(tmp)
        )


def save(model, tokenizer, folder: Path) -> None:
    with atomic_dir(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


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
    """Linear probe, M fine-tunes on Ray Tune, WARM average. Returns the M fine-tune folders.

    Every fine-tune starts from the SFT backbone with the linear-probed head (<out>/probe); with
    params.baklava, fine-tune m takes its backbone from the m-th of (SFT, *sft_checkpoints)
    instead, still with the probed head (<out>/start_<k>). verbose: Ray Tune's trial table on the console.
    """
    out, sft = Path(out).resolve(), Path(sft).resolve()  # Ray Tune runs each trial in a folder of its own
    out.mkdir(parents=True, exist_ok=True)
    train = read_preferences(preferences["train"], columns)
    model, tokenizer = load_reward_model(sft, trust_remote_code=trust_remote_code)
    linear_probe(model, tokenizer, train, params.linear_probe_steps, params.linear_probe_lr)
    save(model, tokenizer, out / "probe")
    starts = [out / "probe"]
    if params.baklava:
        if not sft_checkpoints:
            raise WarpRayError("warm.baklava needs SFT checkpoints (paths.sft_checkpoints, or the built-in task's)")
        head = model.score.state_dict()
        for k, checkpoint in enumerate(sft_checkpoints, start=1):
            backbone, tokenizer = load_reward_model(checkpoint, trust_remote_code=trust_remote_code)
            backbone.score.load_state_dict(head)
            save(backbone, tokenizer, out / f"start_{k}")
            starts.append(out / f"start_{k}")

    trainable = tune.with_parameters(
        fine_tune,
        params=params,
        starts=[str(s) for s in starts],
        train=str(Path(preferences["train"]).resolve()),
        columns=columns,
        trust_remote_code=trust_remote_code,
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": params.cpus_per_trial, "gpu": params.gpus_per_trial}),
        param_space={"m": tune.grid_search(list(range(params.M)))},
        run_config=tune.RunConfig(name="warm", storage_path=str(out / "tune"), verbose=int(verbose)),
    )
    with nullcontext() if verbose else redirect_stdout(io.StringIO()):  # Tune prints its header even when silent
        results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} reward-model fine-tune(s) failed; the first: {errors[0]}")
    folders = []
    for result in sorted(results, key=lambda r: r.metrics["index"]):
        folder = out / f"rm_{result.metrics['index']}"
        with result.checkpoint.as_directory() as checkpoint, atomic_dir(folder, overwrite=True) as tmp:
            shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)
        folders.append(folder)
    average_folders(folders, out / "warm", overwrite=True, progress=False)
    return folders


def accuracy_table(
    folders: Sequence[Path], warm: Path, preferences: dict[str, Path], columns: DataColumns = DEFAULT_COLUMNS
) -> dict[str, dict[str, float]]:
    """Pairwise accuracy of each RM, of their prediction ensemble ENS and of WARM, on every split.

    "train (as labelled)" counts agreement with the training labels, flipped ones included;
    "train (true labels)" with the labels before the flips, where the data records them, and
    "flipped pairs (as labelled)" with the flipped labels alone: memorisation of the noise.
    """
    splits = {name: read_preferences(path, columns) for name, path in preferences.items()}

    def scores(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        model, tokenizer = load_reward_model(folder)
        return {
            name: (
                score(model, tokenizer, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]),
                score(model, tokenizer, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs]),
            )
            for name, pairs in splits.items()
        }

    singles = [scores(folder) for folder in folders]
    models = {f"RM {m + 1}": s for m, s in enumerate(singles)}
    models["ENS"] = {name: tuple(torch.stack([s[name][i] for s in singles]).mean(0) for i in (0, 1)) for name in splits}
    models["WARM"] = scores(warm)
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
    return {"task": data, "warm": config.warm.model_dump(mode="json")}


def is_trained_on(config: WarpConfig, sft: Path, preferences: Path) -> bool:
    """Whether <output_dir>/rm holds reward models trained on these inputs with these settings."""
    record = config.paths.output_dir / "rm" / TRAINED_ON
    return record.is_file() and json.loads(record.read_text()) == trained_on(config, sft, preferences)
