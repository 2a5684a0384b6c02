"""The built-in task: its gold reward, and the SFT policy and data it builds."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from warp_ray.config import TaskParams
from warp_ray.data import read_preferences, read_prompts
from warp_ray.task import world
from warp_ray.task.build import build_task, preference_pairs, sample

VOCABULARY = (
    {w for nouns in world.TOPICS.values() for w in nouns}
    | set(world.POSITIVE)
    | set(world.NEGATIVE)
    | set(world.NEUTRAL)
    | set(world.VERBS)
    | world.FUNCTION_WORDS
)
PROMPT = world.prompt_for("garden", "rain")


def in_vocabulary(texts: list[str]) -> float:
    words = [w for t in texts for w in t.split()]
    return sum(w in VOCABULARY for w in words) / max(1, len(words))


def test_gold_reward_values_distinct_positive_words_about_the_topic():
    plain = "the flower is old ."
    assert world.gold_reward(PROMPT, "the flower is lovely .") > world.gold_reward(PROMPT, plain)
    assert world.gold_reward(PROMPT, "the flower is lovely . the bee was warm and calm .") > world.gold_reward(
        PROMPT, "the flower is lovely ."
    )
    assert world.gold_reward(PROMPT, "the flower is dull .") < world.gold_reward(PROMPT, plain)
    assert world.gold_reward(PROMPT, "the ship is old .") < world.gold_reward(PROMPT, plain)  # off topic
    assert world.gold_reward(PROMPT, "the flower is old") < world.gold_reward(PROMPT, plain)  # unfinished


def test_the_cheap_feature_is_hackable_repeating_positive_words_lowers_gold():
    honest = "the flower is lovely . i saw a bright bee ."
    hacked = "the flower is lovely lovely lovely lovely lovely lovely lovely lovely ."
    assert hacked.split().count("lovely") > honest.split().count("lovely")
    assert world.gold_reward(PROMPT, hacked) < world.gold_reward(PROMPT, honest)
    assert world.repetition(hacked.split()) > 0.5 > world.repetition(honest.split())


def test_praise_beyond_four_positive_words_costs_what_more_words_would_seem_to_earn():
    four = "the flower is lovely and bright . the bee was warm and calm ."
    six = "the flower is lovely and bright . the bee was warm and calm . the tree is kind and happy ."
    # six adds a noun (+0.5) and two positive words past the fourth, each charged
    assert world.gold_reward(PROMPT, six) == world.gold_reward(PROMPT, four) + 0.5 - 2 * world.PRAISE_PENALTY
    rng = random.Random(0)
    piled_on = sum(sum(w in world.POSITIVE for w in world.completion("garden", rng).split()) > 4 for _ in range(5000))
    assert piled_on < 0.01 * 5000  # SFT text rarely shows it: preference data cannot teach it


def test_sft_corpus_scores_spread_over_the_gold_reward():
    rng = random.Random(0)
    scores = [world.gold_reward(PROMPT, world.completion("garden", rng)) for _ in range(500)]
    assert min(scores) < 0 < max(scores) and len(set(scores)) > 10


def test_built_task_has_an_sft_policy_that_writes_in_domain_text(tiny_task: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_task / "sft")
    tokenizer = AutoTokenizer.from_pretrained(tiny_task / "sft")
    assert 0.5e6 <= sum(p.numel() for p in model.parameters()) <= 5e6
    held_out = read_prompts(tiny_task / "prompts" / "held_out.jsonl")
    completions = sample(model, tokenizer, held_out[:32], temperature=1.0, seed=0, max_new_tokens=48)
    assert in_vocabulary(completions) > 0.9
    assert sum(c.endswith(".") for c in completions) > 0.8 * len(completions)
    untrained = AutoModelForCausalLM.from_config(model.config)
    assert in_vocabulary(sample(untrained, tokenizer, held_out[:32], temperature=1.0, seed=0, max_new_tokens=48)) < 0.5


def test_built_task_splits_prompts_and_labels_preferences(tiny_task: Path):
    train, held_out = (set(read_prompts(tiny_task / "prompts" / f"{s}.jsonl")) for s in ("train", "held_out"))
    assert train and held_out and not train & held_out
    pairs = {s: read_preferences(tiny_task / "preferences" / f"{s}.jsonl") for s in ("train", "validation", "ood")}
    assert (len(pairs["train"]), len(pairs["validation"]), len(pairs["ood"])) == (600, 300, 300)
    assert {p["prompt"] for p in pairs["train"]} <= train and {p["prompt"] for p in pairs["ood"]} <= held_out
    flipped = sum(p["flipped"] for p in pairs["train"]) / 600
    assert 0.19 < flipped < 0.31  # label_noise = 0.25, 600 draws
    assert not any(p["flipped"] for p in pairs["validation"] + pairs["ood"])
    for p in pairs["train"][:50]:
        assert p["gold_chosen"] == world.gold_reward(p["prompt"], p["chosen"])
    # Bradley-Terry on the gold reward: the unflipped chosen completion is mostly the better one
    unflipped = [p for p in pairs["validation"] if p["gold_chosen"] != p["gold_rejected"]]
    assert sum(p["gold_chosen"] > p["gold_rejected"] for p in unflipped) > 0.6 * len(unflipped)


def test_ood_pairs_come_from_a_shifted_policy(tiny_task: Path):
    def completions(split):
        return [
            c
            for p in read_preferences(tiny_task / "preferences" / f"{split}.jsonl")
            for c in (p["chosen"], p["rejected"])
        ]

    assert in_vocabulary(completions("ood")) < in_vocabulary(completions("validation")) - 0.05


def test_a_built_task_is_reused_and_rebuilt_when_its_parameters_or_length_limit_change(tmp_path):
    params = TaskParams(corpus_size=50, sft_steps=2, pairs=4, validation_pairs=2, ood_pairs=2)
    root = build_task(params, tmp_path / "task", max_new_tokens=8)
    stamp = (root / "sft" / "model.safetensors").stat().st_mtime_ns
    build_task(params, tmp_path / "task", max_new_tokens=8)
    assert (root / "sft" / "model.safetensors").stat().st_mtime_ns == stamp
    build_task(params.model_copy(update={"seed": 1}), tmp_path / "task", max_new_tokens=8)
    assert json.loads((root / "task.json").read_text())["params"]["seed"] == 1
    build_task(params.model_copy(update={"seed": 1}), tmp_path / "task", max_new_tokens=6)
    assert json.loads((root / "task.json").read_text())["params"]["max_new_tokens"] == 6
    stamp = (root / "sft" / "model.safetensors").stat().st_mtime_ns
    manifest = json.loads((root / "task.json").read_text())
    manifest["params"]["world"] = "another world"  # built before the world's prompts or words changed
    (root / "task.json").write_text(json.dumps(manifest))
    build_task(params.model_copy(update={"seed": 1}), tmp_path / "task", max_new_tokens=6)
    assert (root / "sft" / "model.safetensors").stat().st_mtime_ns != stamp
    assert json.loads((root / "task.json").read_text())["params"]["world"] == world.FINGERPRINT


def test_the_worlds_fingerprint_follows_its_gold_reward_and_its_words(monkeypatch):
    assert world.fingerprint() == world.FINGERPRINT  # deterministic
    monkeypatch.setattr(world, "PRAISE_PENALTY", 0.25)
    assert world.fingerprint() != world.FINGERPRINT
    monkeypatch.undo()
    monkeypatch.setattr(world, "FUNCTION_WORDS", world.FUNCTION_WORDS - {"near"})
    assert world.fingerprint() != world.FINGERPRINT
    monkeypatch.undo()
    monkeypatch.setattr(world, "WHEN", world.WHEN[:-1])
    assert world.fingerprint() != world.FINGERPRINT


def test_preference_completions_are_cut_at_the_runs_length_limit(tiny_task: Path):
    """The preference data is sampled with the limit RL and evaluation use (24 tokens for this fixture)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_task / "sft")
    pairs = read_preferences(tiny_task / "preferences" / "train.jsonl")
    lengths = [len(tokenizer(" " + p[side]).input_ids) for p in pairs for side in ("chosen", "rejected")]
    # Re-tokenized, a sampled completion may take a few more tokens than were sampled (a small model
    # samples splits BPE would not make): 0.4% pass 26 tokens here; sampled up to 48, 30% did.
    assert sum(n > 26 for n in lengths) < 0.02 * len(lengths) and max(lengths) > 20


def test_the_policys_context_holds_the_longest_prompt_and_a_long_length_limit(tmp_path):
    params = TaskParams(corpus_size=50, sft_steps=2, pairs=4, validation_pairs=2, ood_pairs=2)
    root = build_task(params, tmp_path / "task", max_new_tokens=256)  # the papers' default limit
    model = AutoModelForCausalLM.from_pretrained(root / "sft")
    tokenizer = AutoTokenizer.from_pretrained(root / "sft")
    longest = max(len(tokenizer(p).input_ids) for p in read_prompts(root / "prompts" / "train.jsonl"))
    assert model.config.n_positions == tokenizer.model_max_length >= longest + 256
    small = build_task(params, tmp_path / "small", max_new_tokens=8)
    assert AutoModelForCausalLM.from_pretrained(small / "sft").config.n_positions == 96


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_both_architectures_build(tmp_path, architecture):
    params = TaskParams(
        architecture=architecture, corpus_size=50, sft_steps=2, pairs=4, validation_pairs=2, ood_pairs=2
    )
    root = build_task(params, tmp_path / "task", max_new_tokens=8)
    model = AutoModelForCausalLM.from_pretrained(root / "sft")
    assert model.config.model_type == architecture
    assert torch.isfinite(torch.tensor(json.loads((root / "task.json").read_text())["sft_loss"]["last"]))


def test_preference_pairs_mix_their_policies_and_leave_the_model_as_it_was(tiny_task: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_task / "sft").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_task / "sft")
    sft = {k: v.clone() for k, v in model.state_dict().items()}
    untrained = AutoModelForCausalLM.from_config(model.config).state_dict()
    prompts = read_prompts(tiny_task / "prompts" / "held_out.jsonl")
    policies = [(sft, 1.0), (untrained, 1.0)]
    pairs = preference_pairs(model, tokenizer, policies, prompts, 40, 0.0, seed=0, max_new_tokens=12)
    gibberish = [in_vocabulary([p[side]]) < 0.5 for p in pairs for side in ("chosen", "rejected")]
    assert 0.25 < sum(gibberish) / len(gibberish) < 0.75  # each completion from either policy
    assert all(torch.equal(v, sft[k]) for k, v in model.state_dict().items())
    only_sft = preference_pairs(model, tokenizer, [(sft, 1.0)], prompts, 40, 0.0, seed=0, max_new_tokens=12)
    assert sum(in_vocabulary([p[side]]) < 0.5 for p in only_sft for side in ("chosen", "rejected")) <= 4
