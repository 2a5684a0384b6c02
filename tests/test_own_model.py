"""A user's own models and data, end to end on real vLLM, DeepSpeed and Ray: a Qwen2 policy with
Qwen's chat format and a Llama reward model with Llama 2's (two different tokenizers), chat
prompts in Parquet files under a column of its own name. Nothing of the built-in task is built.
WARM trained on a user's own preference pairs (Parquet, chat messages, columns of their own) is
tests/test_architectures.py's Gemma run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pyarrow
import pyarrow.parquet
import pytest
import ray
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.helpers import actor_table_rows, chat_tokenizer, save_tiny_model, tiny_run_config
from warp_ray.checkpoint import weight_layout
from warp_ray.cli import main
from warp_ray.config import WarpConfig
from warp_ray.reward.server import RewardServer, RewardSource
from warp_ray.rollout.worker import RolloutWorker

pytestmark = pytest.mark.slow

TOPICS = ["the sea", "the wind", "a kind answer", "a short poem", "the reward", "the model", "a garden", "the night"]
PROMPT_KEY = "question"


def conversation(topic: str) -> list[dict]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"write about {topic}"}]


@pytest.fixture(scope="module")
def own(tmp_path_factory) -> Path:
    """policy/ (Qwen2, no model_max_length in its tokenizer), rm/ (Llama, its own tokenizer) and
    prompts/ (Parquet, chat messages, column question)."""
    root = tmp_path_factory.mktemp("own")
    save_tiny_model(
        root / "policy", AutoModelForCausalLM, Qwen2Config, chat_tokenizer("chatml"), tie_word_embeddings=True
    )
    save_tiny_model(root / "rm", AutoModelForSequenceClassification, LlamaConfig, chat_tokenizer("inst"), num_labels=1)
    for folder, split, topics in (("prompts", "train", TOPICS), ("prompts", "held_out", TOPICS[:4])):
        rows = [{PROMPT_KEY: conversation(t)} for t in topics]
        (root / folder).mkdir(exist_ok=True)
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), root / folder / f"{split}.parquet")
    return root


def own_config(own: Path, out: Path, **paths) -> WarpConfig:
    return tiny_run_config(
        out, {"sft_model": own / "policy", "prompts": own / "prompts", **paths}, data={"prompt_key": PROMPT_KEY}
    )


def test_the_engine_and_the_reward_server_each_read_a_chat_in_their_own_format(own, ray_cluster):
    prompts = [conversation(t) for t in TOPICS[:3]]
    engine = RolloutWorker.remote(str(own / "policy"), max_model_len=128, seed=0, in_process=True)
    server = RewardServer.remote(RewardSource(folders=(str(own / "rm"),)))
    try:
        samples = [g[0] for g in ray.get(engine.generate.remote(prompts, 1, 1.0, 8, [1, 2, 3]))]
        scores = ray.get(server.score.remote(prompts, [s["text"] for s in samples]))
    finally:
        ray.kill(engine)
        ray.kill(server)
    qwen, llama = chat_tokenizer("chatml"), chat_tokenizer("inst")
    for prompt, s in zip(prompts, samples):
        assert s["prompt_token_ids"] == qwen.apply_chat_template(prompt, add_generation_prompt=True)["input_ids"]
    rm = LlamaForSequenceClassification.from_pretrained(own / "rm").eval()
    for prompt, s, served in zip(prompts, samples, scores):
        chat = prompt + [{"role": "assistant", "content": s["text"].strip()}]
        ids = torch.tensor([llama.apply_chat_template(chat)["input_ids"]])
        assert ids[0, 0] == llama.bos_token_id and (ids == llama.bos_token_id).sum() == 1
        with torch.no_grad():
            assert served == pytest.approx(rm(ids).logits[0, 0].item(), abs=1e-5)  # Llama's format, not Qwen's


@dataclass
class WarpRun:
    config: WarpConfig
    out: Path
    console: str  # what `warp-ray warp` printed, stdout and stderr


@pytest.fixture(scope="module")
def warp_run(own, tmp_path_factory) -> WarpRun:
    """One WARP iteration with two learners on the user's inputs, W&B offline, the reward model and
    the SFT reference served by two replicas each: `warp-ray warp` as a user runs it, in a process of
    its own (its own Ray cluster)."""
    out = tmp_path_factory.mktemp("run")
    config = own_config(own, out, reward_model=str(own / "rm"))
    config.logging = {"wandb": {"project": "warp-ray-tests", "mode": "offline"}}
    config.reward_server = {"replicas": 2}
    config.evaluation = {**config.evaluation.model_dump(), "reference_replicas": 2}
    assert chat_tokenizer("chatml").model_max_length > 1e29  # no limit set: the model's 128 positions are used
    (yaml := tmp_path_factory.mktemp("config") / "run.yaml").write_text(config.to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "warp_ray.cli", "warp", "--config", str(yaml)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    return WarpRun(config, out, console)


def test_warp_runs_on_chat_prompts_in_parquet_with_a_reward_model_of_another_tokenizer(warp_run):
    out = warp_run.out
    (wandb_log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # the coordinator's W&B run
    assert b"policy_1/kl_to_anchor" in wandb_log.read_bytes()
    assert not (out / "task").exists()  # nothing of the built-in task
    model = AutoModelForCausalLM.from_pretrained(out / "iteration_0" / "model")
    assert isinstance(model, Qwen2ForCausalLM)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    sft = dict(AutoModelForCausalLM.from_pretrained(warp_run.config.paths.sft_model).named_parameters())
    assert any(not torch.equal(p, sft[n]) for n, p in model.named_parameters())  # the iteration trained and merged
    assert "lm_head.weight" not in weight_layout(out / "iteration_0" / "model")  # tied: the embedding saved once
    manifest = json.loads((out / "iteration_0" / "manifest.json").read_text())
    rewards = [m["reward"] for m in manifest["final_metrics"]]
    assert len(rewards) == 2 and all(math.isfinite(r) for r in rewards)
    front = json.loads((out / "iteration_0" / "front.json").read_text())
    assert sorted((p["towards"], p["eta"]) for p in front) == [("init", 0.0), ("init", 1.0), ("sft", 0.0), ("sft", 1.0)]
    assert all(math.isfinite(p["reward"]) and math.isfinite(p["kl_to_sft"]) for p in front)


def test_the_console_shows_the_stages_and_the_learners_and_the_logs_go_to_files(warp_run):
    """By default the console holds the stages, a line per learner and the summary, and every
    worker's output is in log files."""
    console = warp_run.console
    lines = console.splitlines()
    assert len(lines) < 60, console
    assert "WARP iteration 0: 2 learners, 2 REINFORCE steps each" in console
    assert sum(line.lstrip().startswith(("policy 0 ", "policy 1 ")) and " 2/2 " in line for line in lines) >= 2
    assert "LITI front (held-out prompts):" in console and "final policy:" in console
    assert "vLLM" not in console and "DeepSpeed" not in console and "pid=" not in console  # in the logs instead
    worker_logs = "".join(p.read_text(errors="replace") for p in (warp_run.out / "logs" / "ray").glob("worker-*"))
    assert "Resolved architecture: Qwen2ForCausalLM" in worker_logs  # vLLM's own log line, in its file


@pytest.fixture(scope="module")
def moved(own, tmp_path_factory) -> Path:
    """A user's own checkpoint: the policy moved by a random task vector, far enough to be measured."""
    folder = tmp_path_factory.mktemp("moved")
    model = AutoModelForCausalLM.from_pretrained(own / "policy")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.save_pretrained(folder)
    chat_tokenizer("chatml").save_pretrained(folder)
    return folder


def served_once(config: WarpConfig, out: Path) -> WarpConfig:
    """The run's config with one reward server and one reference (eval and compare start their own,
    and the run has tested the replicas), writing under `out`: the run's folder, its logs' link
    included, stays as the run left it."""
    return WarpConfig.from_dict(
        {
            **config.model_dump(mode="json"),
            "reward_server": {"replicas": 1},
            "evaluation": {**config.evaluation.model_dump(mode="json"), "reference_replicas": 1},
            "paths": {**config.paths.model_dump(mode="json"), "output_dir": str(out)},
        }
    )


def test_eval_measures_policies_as_the_run_does(warp_run, moved, ray_cluster, tmp_path):
    config = served_once(warp_run.config, tmp_path / "out")
    (tmp_path / "run.yaml").write_text(config.to_yaml())
    argv = ["eval", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "eval.json")]
    started = {cls: len(actor_table_rows(cls)) for cls in ("RolloutWorker", "RewardServer", "ReferencePolicy")}
    assert main(argv + ["--model", str(moved), str(tmp_path / "missing")]) == 2
    assert {cls: len(actor_table_rows(cls)) for cls in started} == started  # every model checked before any start
    assert not (tmp_path / "eval.json").exists()
    # The SFT second: its weights loaded into the moved checkpoint's engine, whose KL to the SFT must then be 0.
    assert main(argv + ["--model", str(moved), str(config.paths.sft_model)]) == 0
    assert len(actor_table_rows("RolloutWorker")) == started["RolloutWorker"] + 1  # one engine for both
    by_folder = json.loads((tmp_path / "eval.json").read_text())
    measures = {"sft": by_folder[str(config.paths.sft_model)], "moved": by_folder[str(moved)]}
    assert set(measures["sft"]) == {"reward", "reward_se", "kl_to_sft", "kl_to_sft_se", "truncated", "truncated_se"}
    assert abs(measures["sft"]["kl_to_sft"]) < 1e-5, measures  # the SFT against itself: rounding only
    assert measures["moved"]["kl_to_sft"] > 0.1, measures  # 0.76 (SE 0.48 over 4 prompts) seen, seeded
    assert measures["moved"]["reward"] != measures["sft"]["reward"]
    assert all(math.isfinite(v) for v in measures["moved"].values()) and 0 <= measures["moved"]["truncated"] <= 1


def test_compare_gives_a_win_rate_with_its_interval(warp_run, moved, ray_cluster, tmp_path):
    config, out = served_once(warp_run.config, tmp_path / "out"), warp_run.out
    (tmp_path / "run.yaml").write_text(config.to_yaml())
    sft, iteration = str(config.paths.sft_model), str(out / "iteration_0" / "model")  # the run's own output folder
    rates = {}
    for name, a, b in (("itself", iteration, iteration), ("moved", str(moved), sft)):
        engines = len(actor_table_rows("RolloutWorker"))
        assert main(["compare", "--config", str(tmp_path / "run.yaml"), a, b, "--out", str(tmp_path / name)]) == 0
        rates[name] = json.loads((tmp_path / name).read_text())
        assert len(actor_table_rows("RolloutWorker")) == engines + 1  # b's weights loaded into a's engine
    assert rates["itself"] == {"win_rate": 0.5, "low": 0.5, "high": 0.5, "pairs": 8}  # the same samples: all ties
    moved_rate = rates["moved"]
    # other completions, other rewards: wins and losses, not all ties, so an interval of some width
    assert 0 <= moved_rate["low"] < moved_rate["win_rate"] < moved_rate["high"] <= 1 and moved_rate["pairs"] == 8
    assert main(["compare", "--config", str(tmp_path / "run.yaml"), sft, sft, "--reward", "control"]) == 2  # none here
