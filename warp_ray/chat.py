"""Prompts as each model reads them. A prompt is plain text or a list of chat messages
([{"role": "user", "content": ...}]); a completion is text, or in preference data the assistant's
messages. Plain text is read as it is. Messages are rendered by each model's own chat template:
the policy's with the generation prompt added, a reward model's with the completion as the
assistant's reply. So a policy and a reward model of different families each read the
conversation in the form they were trained on.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Union

from warp_ray.errors import WarpRayError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]
Prompt = Union[str, Messages]


class ChatTemplateError(WarpRayError):
    """Messages that a tokenizer cannot render: it has no chat template, or its template refuses them."""


def messages_problem(value: object) -> str | None:
    """Why `value` is not a list of chat messages, or None if it is one."""
    if not isinstance(value, list) or not value:
        return f"expected a string or a non-empty list of messages, got {_kind(value)}"
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not all(isinstance(message.get(k), str) for k in ("role", "content")):
            return f"message {i} must be an object with string 'role' and 'content' (got {_kind(message)})"
    return None


def _kind(value: object) -> str:
    return "an empty list" if value == [] else f"a {type(value).__name__}"


def prompt_key(prompt: Prompt) -> str:
    """A prompt as a dict key: its text, or its messages as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def policy_ids(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """The token ids the policy reads for a prompt (what the rollout engine is given and the learner
    checks it against): text tokenized as it is, messages through the chat template with the
    generation prompt. A template writes its own special tokens, so none are added to it."""
    if isinstance(prompt, str):
        return tokenizer(prompt).input_ids
    return tokenizer(_template(tokenizer, prompt, generation_prompt=True), add_special_tokens=False).input_ids


def reward_text(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str | Messages) -> str:
    """The text a reward model reads for (x, y), in training, in RL and in evaluation alike.

    Plain text: the prompt, one space, the completion without surrounding whitespace. A completion
    sampled by vLLM starts with the space its first token carries, and the same completion in
    preference data usually does not; both must reach the RM as the same tokens at the same
    positions. Messages: the conversation with the completion as the assistant's reply, through the
    RM's chat template, without the BOS token that tokenizing the text adds again."""
    if isinstance(prompt, str):
        return f"{prompt.rstrip()} {completion.strip()}"
    reply = [{"role": "assistant", "content": completion.strip()}] if isinstance(completion, str) else completion
    text = _template(tokenizer, prompt + reply, generation_prompt=False)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("").input_ids[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def with_padding(tokenizer: "PreTrainedTokenizerBase") -> "PreTrainedTokenizerBase":
    """`tokenizer`, padding with its EOS token if it has no pad token (Llama 3's, Mistral's): padded
    positions are masked out of every forward pass, so any token will do."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _template(tokenizer: PreTrainedTokenizerBase, messages: Messages, generation_prompt: bool) -> str:
    if tokenizer.chat_template is None:
        raise ChatTemplateError(
            f"chat messages to render, but the tokenizer {tokenizer.name_or_path!r} has no chat template "
            "(chat_template in its tokenizer_config.json); give it one, or give prompts as plain text"
        )
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:  # a template's raise_exception: a role it takes no turn of, roles out of order
        roles = ", ".join(m["role"] for m in messages)
        raise ChatTemplateError(
            f"the chat template of the tokenizer {tokenizer.name_or_path!r} refuses messages of roles {roles}: {e}"
        ) from None
