"""WARM on a real local Ray cluster: fine-tunes as Ray Train runs of two DeepSpeed workers in a
Ray Tune sweep, a worker killed mid-run, weight averaging, the accuracy table on Ray tasks."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from warp_ray.config import WarmParams
from warp_ray.data import DEFAULT_COLUMNS, preference_splits, read_preferences
from warp_ray.reward.model import load_reward_model, pairwise_accuracy, score
from warp_ray.reward.warm import accuracy_table, held_at_once, markdown, probed_starts, scoring_shards, train_warm

pytestmark = pytest.mark.slow


def kill_a_worker_after_its_first_checkpoint(out: Path, stop: threading.Event) -> list[int]:
    """SIGKILL rank 0 of the first fine-tune that Tune has a report of (a Ray Train worker, not the
    Tune trial that drives it): its checkpoint is then registered. Returns [its index] once killed."""
    while not stop.is_set():
        for result in (out / "tune" / "warm").glob("*/result.json"):
            if reports := result.read_text().splitlines():
                report = json.loads(reports[-1])
                try:
                    os.kill(report["worker_pid"], signal.SIGKILL)
                except ProcessLookupError:  # that run has ended: look for another
                    continue
                return [report["index"]]
        time.sleep(0.2)
    return []


@pytest.fixture(scope="module")
def warm_run(tiny_task, ray_cluster, tmp_path_factory):
    checkpoints = sorted((tiny_task / "sft_checkpoints").iterdir())
    assert len(checkpoints) == 2  # task.sft_checkpoints, evenly spaced along the SFT run
    params = WarmParams(
        M=2,
        learning_rates=[1e-4, 3e-4],
        dropouts=[0.1],
        steps=150,
        batch_size=16,
        linear_probe_steps=200,
        workers_per_rm=2,
        zero_stage=2,  # Adam's state sharded: each worker writes and resumes its own part
        cpus_per_trial=1,  # both fine-tunes at once on the 2 CPUs
        checkpoint_every=50,
        baklava=True,
    )
    out = tmp_path_factory.mktemp("warm")
    stop = threading.Event()
    killed = []
    killer = threading.Thread(target=lambda: killed.extend(kill_a_worker_after_its_first_checkpoint(out, stop)))
    killer.start()
    # Relative paths, as a config's `runs/...` gives them: Ray Tune runs trials in folders of its own.
    cwd = os.getcwd()
    os.chdir(out.parent)
    try:
        task = Path(os.path.relpath(tiny_task, out.parent))
        folders = train_warm(params, task / "sft", preference_splits(task / "preferences"), Path(out.name), checkpoints)
    finally:
        os.chdir(cwd)
        stop.set()
        killer.join()
    trials = {}
    for result in (out / "tune" / "warm").glob("*/result.json"):
        reports = [json.loads(line) for line in result.read_text().splitlines()]
        trials[reports[-1]["index"]] = reports
    return params, preference_splits(tiny_task / "preferences"), out, [out / f.name for f in folders], trials, killed


def test_tune_trials_fine_tune_diverse_rms_from_one_probed_start(warm_run):
    params, _, out, folders, trials, _ = warm_run
    assert [f.name for f in folders] == ["rm_0", "rm_1"]
    assert sorted((m, t[-1]["lr"], t[-1]["seed"], t[-1]["step"]) for m, t in trials.items()) == [
        (0, 1e-4, 1000, 150),
        (1, 3e-4, 1001, 150),
    ]
    probe, first, second = (load_file(f / "model.safetensors") for f in (out / "probe", *folders))
    head = "score.weight"
    assert not torch.equal(first[head], probe[head]) and not torch.equal(first[head], second[head])


def test_the_probe_draws_its_new_head_with_warm_seed(tiny_task, tmp_path):
    """The probe's score head is new, drawn as the model is built: unseeded, it made every WARM run's
    reward models differ, at the same settings."""
    train = str(preference_splits(tiny_task / "preferences")["train"])
    threads = torch.get_num_threads()  # the probe sets its Ray task's threads and seed, here this process's

    def probed_head(seed: int, out: Path) -> torch.Tensor:
        params = WarmParams(linear_probe_steps=20, seed=seed)
        probed_starts(params, str(tiny_task / "sft"), train, DEFAULT_COLUMNS, str(out), [], False)
        return load_file(out / "probe" / "model.safetensors")["score.weight"]

    try:
        with torch.random.fork_rng():
            first, again, other = (probed_head(s, tmp_path / str(i)) for i, s in enumerate((0, 0, 1)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert [WarmParams(seed=s).trial(1)["seed"] for s in (0, 1)] == [1001, 2001]


def test_the_two_workers_of_a_fine_tune_end_with_the_same_weights(warm_run):
    params, _, out, folders, trials, _ = warm_run
    assert params.workers_per_rm == 2
    for reports in trials.values():
        assert reports[-1]["rank_spread"] == 0.0
    # ...and they trained it: the saved model is not its start
    start, end = load_file(out / "probe" / "model.safetensors"), load_file(folders[0] / "model.safetensors")
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(start[key], end[key])


def test_a_worker_killed_mid_run_is_restarted_from_the_checkpoint_and_the_fine_tune_completes(warm_run):
    params, _, out, folders, trials, killed = warm_run
    assert killed, "no fine-tune reported a checkpoint to kill a worker after"
    (m,) = killed
    resumed = {i: t[-1]["resumed_from"] for i, t in trials.items()}
    assert resumed[m] in range(params.checkpoint_every, params.steps, params.checkpoint_every)
    assert all(step == 0 for i, step in resumed.items() if i != m)  # the other ran through
    assert all(t[-1]["step"] == params.steps for t in trials.values())
    assert trials[m][-1]["worker_pid"] != trials[m][0]["worker_pid"]  # a new rank 0 finished the run...
    assert not list((out / "tune" / "warm").glob("*/error.txt"))  # ...restarted by Ray Train: no Tune trial failed
    model, tokenizer = load_reward_model(folders[m])  # the restarted run's checkpoint loads as a reward model
    assert score(model, tokenizer, ["the"], ["bee"]).isfinite().all()


def test_baklava_starts_take_backbones_from_sft_checkpoints_and_share_the_probed_head(tiny_task, warm_run):
    _, _, out, _, trials, _ = warm_run
    checkpoints = sorted((tiny_task / "sft_checkpoints").iterdir())
    probe, start = load_file(out / "probe" / "model.safetensors"), load_file(out / "start_1" / "model.safetensors")
    checkpoint = load_file(checkpoints[0] / "model.safetensors")
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(start[key], checkpoint[key]) and not torch.equal(start[key], probe[key])
    assert torch.equal(start["score.weight"], probe["score.weight"])
    assert {m: t[-1]["start"] for m, t in trials.items()} == {0: str(out / "probe"), 1: str(out / "start_1")}


def test_warm_is_the_weight_average_and_one_model(warm_run):
    _, splits, out, folders, _, _ = warm_run
    rms = [load_file(f / "model.safetensors") for f in folders]
    warm = load_file(out / "warm" / "model.safetensors")
    for key in ("score.weight", "transformer.h.0.attn.c_attn.weight"):
        assert torch.allclose(warm[key], (rms[0][key] + rms[1][key]) / 2, atol=1e-6)
    model, tokenizer = load_reward_model(out / "warm")
    pairs = read_preferences(splits["validation"])[:128]
    prompts, chosen = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    one_pass = score(model, tokenizer, prompts, chosen, batch_size=128)
    ens = torch.stack([score(*load_reward_model(f), prompts, chosen) for f in folders]).mean(0)
    assert one_pass.shape == (128,)
    assert not torch.allclose(one_pass, ens)  # weight averaging is not prediction averaging...
    assert torch.corrcoef(torch.stack([one_pass, ens]))[0, 1] > 0.6  # ...but, to first order, they agree


def test_reward_models_beat_chance_on_held_out_pairs(warm_run):
    _, splits, out, folders, _, _ = warm_run
    # One CPU per task: 2 at once on the cluster's 2 CPUs, so RM 1 and RM 2 score whole and WARM in halves.
    params = warm_run[0].model_copy(update={"workers_per_rm": 1})
    assert scoring_shards(3, held_at_once(params.cpus_per_worker, 0)) == [(0, 0, 1), (1, 0, 1), (2, 0, 2), (2, 1, 2)]
    table = accuracy_table(folders, out / "warm", splits, params)
    assert set(table) == {"RM 1", "RM 2", "ENS", "WARM"}
    assert set(table["WARM"]) == {
        "train (as labelled)",
        "train (true labels)",
        "flipped pairs (as labelled)",
        "validation",
        "ood",
    }
    # as labelled = true labels, except on the flipped pairs: as labelled - true = p * (2 * flipped - 1)
    p = sum(pair["flipped"] for pair in read_preferences(splits["train"])) / len(read_preferences(splits["train"]))
    for row in table.values():
        assert (
            abs(
                row["train (as labelled)"]
                - row["train (true labels)"]
                - p * (2 * row["flipped pairs (as labelled)"] - 1)
            )
            < 1e-6
        )
    # 300 validation pairs: chance would exceed 0.57 with probability under 1%
    assert table["WARM"]["validation"] > 0.57 and table["ENS"]["validation"] > 0.57
    # WARM's halves put back in order: on the flipped pairs, which a misordered score would mistake,
    # its accuracy is that of its scores in this process (within a pair whose two scores round apart)
    model, tokenizer = load_reward_model(out / "warm")
    pairs = read_preferences(splits["train"])
    prompts, flipped = [p["prompt"] for p in pairs], torch.tensor([p["flipped"] for p in pairs])
    chosen, rejected = (score(model, tokenizer, prompts, [p[k] for p in pairs]) for k in ("chosen", "rejected"))
    here = pairwise_accuracy(chosen[flipped], rejected[flipped])
    assert table["WARM"]["flipped pairs (as labelled)"] == pytest.approx(here, abs=1.5 / int(flipped.sum()))
    assert "| WARM |" in markdown(table)
