"""WARM on a real local Ray cluster: Ray Tune fine-tunes, weight averaging, accuracy table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from warp_ray.config import WarmParams
from warp_ray.data import preference_splits, read_preferences
from warp_ray.reward.model import load_reward_model, score
from warp_ray.reward.warm import accuracy_table, markdown, train_warm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def warm_run(tiny_task, ray_cluster, tmp_path_factory):
    params = WarmParams(
        M=2, learning_rates=[1e-4, 3e-4], dropouts=[0.1], steps=150, batch_size=16, linear_probe_steps=200
    )
    out = tmp_path_factory.mktemp("warm")
    # Relative paths, as a config's `runs/...` gives them: Ray Tune runs trials in folders of its own.
    cwd = os.getcwd()
    os.chdir(out.parent)
    try:
        task = Path(os.path.relpath(tiny_task, out.parent))
        folders = train_warm(params, task / "sft", preference_splits(task / "preferences"), Path(out.name))
    finally:
        os.chdir(cwd)
    return params, preference_splits(tiny_task / "preferences"), out, [out / f.name for f in folders]


def test_tune_trials_fine_tune_diverse_rms_from_one_probed_start(warm_run):
    params, _, out, folders = warm_run
    assert [f.name for f in folders] == ["rm_0", "rm_1"]
    trials = [
        json.loads(line)
        for r in sorted((out / "tune" / "warm").glob("*/result.json"))
        for line in r.read_text().splitlines()
    ]
    assert sorted((t["index"], t["lr"], t["seed"]) for t in trials) == [(0, 1e-4, 1000), (1, 3e-4, 1001)]
    probe, first, second = (load_file(f / "model.safetensors") for f in (out / "probe", *folders))
    head = "score.weight"
    assert not torch.equal(first[head], probe[head]) and not torch.equal(first[head], second[head])


def test_warm_is_the_weight_average_and_one_model(warm_run):
    _, splits, out, folders = warm_run
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
    _, splits, out, folders = warm_run
    table = accuracy_table(folders, out / "warm", splits)
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
    assert "| WARM |" in markdown(table)


def test_baklava_starts_take_backbones_from_sft_checkpoints_and_share_the_probed_head(tiny_task, ray_cluster, tmp_path):
    checkpoints = sorted((tiny_task / "sft_checkpoints").iterdir())
    assert len(checkpoints) == 2  # task.sft_checkpoints, evenly spaced along the SFT run
    params = WarmParams(
        M=2, learning_rates=[1e-4], dropouts=[0.1], steps=5, batch_size=4, linear_probe_steps=10, baklava=True
    )
    train_warm(params, tiny_task / "sft", preference_splits(tiny_task / "preferences"), tmp_path, checkpoints)
    probe, start = (
        load_file(tmp_path / "probe" / "model.safetensors"),
        load_file(tmp_path / "start_1" / "model.safetensors"),
    )
    checkpoint = load_file(checkpoints[0] / "model.safetensors")
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(start[key], checkpoint[key]) and not torch.equal(start[key], probe[key])
    assert torch.equal(start["score.weight"], probe["score.weight"])
    trials = {
        json.loads(r.read_text().splitlines()[-1])["index"]: json.loads(r.read_text().splitlines()[-1])["start"]
        for r in (tmp_path / "tune" / "warm").glob("*/result.json")
    }
    assert trials == {0: str(tmp_path / "probe"), 1: str(tmp_path / "start_1")}
