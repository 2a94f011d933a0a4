"""The instruction / chat format: conversations as the text the model trains on.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content":
str}` (the conversational format of TRL and of Hugging Face chat datasets), or a
`{"prompt": str, "completion": str}` pair, which is one user turn and its answer. It is
rendered as DeepSeek LLM's chat models render it, in plain text, so that it needs no
special token beyond eos and any tokenizer can carry it:

    {system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}<eos>User: {user}\\n\\nAssistant: ...

Training sees each turn as (prompt, answer): the loss covers every assistant message and
the eos after it, never the system, user or "Assistant: " text. The exported
tokenizer_config.json carries the same rendering as a Jinja chat template (`CHAT_TEMPLATE`),
so a serving engine builds the prompts the model was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

USER, ASSISTANT = "User: ", "\n\nAssistant: "
ROLES = ("system", "user", "assistant")

# transformers' apply_chat_template renders this; tests check it against `turns`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\nAssistant: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)


def turns(messages: Sequence[Any]) -> tuple[tuple[str, str], ...]:
    """(prompt, answer) pairs of a conversation: each answer is an assistant message, its
    prompt everything rendered since the previous answer. Raises ValueError naming what is
    wrong (a role, a missing content, no assistant message, two assistant messages in a row)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("expected a non-empty list of messages")
    pairs: list[tuple[str, str]] = []
    prompt = ""
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {n} must be an object with a role ({', '.join(ROLES)}) and a string content")
        role, content = m["role"], m["content"]
        if role == "system":
            prompt += content + "\n\n"
        elif role == "user":
            prompt += USER + content + ASSISTANT
        elif not prompt.endswith(ASSISTANT):
            raise ValueError(f"message {n}: an assistant message must follow a user message")
        else:
            pairs.append((prompt, content))
            prompt = ""
    if not pairs:
        raise ValueError("the conversation has no assistant message to train on")
    return tuple(pairs)


def prompt_text(user: str, system: str = "") -> str:
    """The prompt that asks for an answer to `user` (what generation starts from)."""
    return (system + "\n\n" if system else "") + USER + user + ASSISTANT


def record_turns(record: Any, field: str) -> tuple[tuple[str, str], ...]:
    """The turns of one data record: its `field` (a list of messages), or its prompt and
    completion strings."""
    if isinstance(record, dict) and field in record:
        return turns(record[field])
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return ((prompt_text(record["prompt"]), record["completion"]),)
    raise ValueError(f"expected a '{field}' list of messages, or 'prompt' and 'completion' strings")
