"""Prompts as each model reads them: text as it is, chat messages through the model's own template."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig

from tests.helpers import chat_tokenizer, save_tiny_model
from warp_ray.chat import ChatTemplateError, policy_ids, prompt_key, reward_text, with_padding
from warp_ray.reward.model import load_reward_model, pooled_features, score

CHAT = [{"role": "user", "content": "write a short poem about the sea"}]


@pytest.fixture(scope="module")
def chatml():
    return chat_tokenizer("chatml")


@pytest.fixture(scope="module")
def inst():
    return chat_tokenizer("inst")


@pytest.mark.parametrize("style", ["chatml", "inst"])
def test_the_policy_reads_messages_through_its_template_with_the_generation_prompt(style, chatml, inst):
    tokenizer = {"chatml": chatml, "inst": inst}[style]
    ids = policy_ids(tokenizer, CHAT)
    assert ids == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    if tokenizer.bos_token_id is not None:
        assert ids.count(tokenizer.bos_token_id) == 1  # the template's BOS, not a second one from tokenizing
    assert policy_ids(tokenizer, "the sea") == tokenizer("the sea").input_ids  # text as it is


def test_a_reward_model_reads_the_reply_in_its_own_template(chatml, inst):
    reply = " the wind is kind\n"  # as an engine returns it: the space of its first token
    chatml_text = reward_text(chatml, CHAT, reply)
    assert chatml_text == "<|im_start|>user\nwrite a short poem about the sea<|im_end|>\n" + (
        "<|im_start|>assistant\nthe wind is kind<|im_end|>\n"
    )
    inst_text = reward_text(inst, CHAT, reply)
    assert (
        inst_text == "[INST] write a short poem about the sea [/INST] the wind is kind</s>"
    )  # <s>: tokenizing adds it
    conversation = CHAT + [{"role": "assistant", "content": "the wind is kind"}]
    assert inst(inst_text).input_ids == inst.apply_chat_template(conversation)["input_ids"]
    assert reward_text(inst, CHAT, [{"role": "assistant", "content": "the wind is kind"}]) == inst_text


def test_text_prompts_are_joined_as_before_and_messages_need_a_template(chatml):
    assert reward_text(chatml, "the sea :", " the wind\n") == "the sea : the wind"
    plain = chat_tokenizer("chatml")
    plain.chat_template = None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        policy_ids(plain, CHAT)
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        reward_text(plain, CHAT, "the wind")


def test_a_prompt_of_messages_is_a_key_of_its_own():
    other = [{"role": "user", "content": "write a short poem about the wind"}]
    assert prompt_key(CHAT) == prompt_key([dict(m) for m in CHAT]) != prompt_key(other)
    assert prompt_key("the sea") == "the sea"


def test_a_template_that_refuses_the_messages_says_which_roles():
    strict = chat_tokenizer("inst")
    strict.chat_template = (  # as Gemma's templates do: no system turn
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match=r"refuses messages of roles system, user: System role not supported"):
        policy_ids(strict, [{"role": "system", "content": "be brief"}, *CHAT])


def test_a_tokenizer_without_a_pad_token_pads_with_its_eos():
    tokenizer = chat_tokenizer("inst")
    tokenizer.pad_token = None
    assert with_padding(tokenizer).pad_token_id == tokenizer.eos_token_id
    batch = tokenizer(["the sea", "the wind is kind"], padding=True)
    assert batch.input_ids[0][-1] == tokenizer.eos_token_id and batch.attention_mask[0][-1] == 0


def test_the_linear_probe_reads_the_token_the_reward_model_scores_with_eos_as_padding(tmp_path):
    """A tokenizer without a pad token pads with EOS, and Llama 2's template ends a reply with EOS: the
    features WARM's probe fits must be those at the token the score head reads, the last that is not
    padding."""
    tokenizer = chat_tokenizer("inst")
    tokenizer.pad_token = None
    save_tiny_model(tmp_path, AutoModelForSequenceClassification, LlamaConfig, tokenizer, num_labels=1)
    model, loaded = load_reward_model(tmp_path)
    replies = ["the wind is kind and calm", "the wind", "the sea is calm", "the"]
    prompts = [CHAT] * len(replies)
    assert reward_text(loaded, CHAT, replies[0]).endswith(loaded.eos_token) and loaded.pad_token == loaded.eos_token
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():  # batches of like length, not the given order: the features come back in it
        probed = model.score(pooled_features(model, loaded, prompts, replies, batch_size=2))[:, 0]
    alone = torch.cat([score(model, loaded, [p], [r]) for p, r in zip(prompts, replies)])
    assert len(set(alone.tolist())) == len(replies)
    torch.testing.assert_close(probed, alone)
    assert len(outputs) == 6 and all(out.past_key_values is None for out in outputs)  # scoring builds no KV cache


def test_scores_come_back_in_the_order_given_though_batched_by_length(tmp_path):
    tokenizer = chat_tokenizer("inst")
    save_tiny_model(tmp_path, AutoModelForSequenceClassification, LlamaConfig, tokenizer, num_labels=1)
    model, loaded = load_reward_model(tmp_path)
    replies = ["the wind is kind and calm and the sea", "the", "the wind is kind", "the sea", "the wind"]
    prompts = [CHAT] * len(replies)
    alone = torch.cat([score(model, loaded, [p], [r]) for p, r in zip(prompts, replies)])
    batched = score(model, loaded, prompts, replies, batch_size=2)  # batches of like length: not the given order
    assert len(set(alone.tolist())) == len(replies)
    torch.testing.assert_close(batched, alone)
