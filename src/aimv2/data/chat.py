"""Conversations as a VLM trains on them: the LM's chat template, labels on the answers only, padded batches.

A conversation is a list of messages ``{"role": "user" | "assistant", "content": str}``; one user message holds the
``<image>`` placeholder. It is rendered with the tokenizer's own chat template when it has one, else with the plain
template below, and tokenized once. Which tokens are answers is found on the rendered *text*, not by tokenizing
pieces apart (which can merge differently at the seams): answer k spans the characters from the end of
``render(messages[:k], add_generation_prompt=True)`` to the end of ``render(messages[:k + 1])``, i.e. the answer,
the template's end-of-turn markup and whatever the template closes a turn with; a token is labelled when its first
character lies in such a span (the tokenizer's offset mapping). Everything else (system text, user turns, role
markers, the image placeholder, padding) gets the label -100.

The plain template (a tokenizer with no ``chat_template``)::

    {bos}USER: {user}\\nASSISTANT: {answer}{eos}\\n   ... one pair per turn; a prompt ends with "ASSISTANT: "
"""

from __future__ import annotations

import torch

IGNORE = -100


def plain_template(messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str:
    parts = [bos]
    for m in messages:
        if m["role"] == "user":
            parts.append(f"USER: {m['content']}\n")
        else:
            parts.append(f"ASSISTANT: {m['content']}{eos}\n")
    if add_generation_prompt:
        parts.append("ASSISTANT: ")
    return "".join(parts)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the LM reads it: its chat template, or the plain one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return plain_template(messages, add_generation_prompt, tokenizer.bos_token or "", tokenizer.eos_token or "")


def answer_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end)) character spans of its assistant turns)."""
    text = render(tokenizer, messages)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:k], add_generation_prompt=True))
        end = len(render(tokenizer, messages[: k + 1]))
        spans.append((start, end))
    return text, spans


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one conversation, truncated to ``max_length`` tokens (answers past it lose their
    loss, the placeholder must stay inside)."""
    text, spans = answer_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [
        tok if any(s <= a < e for s, e in spans) else IGNORE
        for tok, (a, _) in zip(ids, enc["offset_mapping"], strict=True)
    ]
    return ids[:max_length], labels[:max_length]


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to the answer the model is to write (the generation prompt)."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def pad_batch(rows: list[list[int]], pad_id: int, *, labels: list[list[int]] | None = None, left: bool = False):
    """Right- (training) or left- (generation) padded (ids [B, T], labels [B, T] or None, attention_mask [B, T])."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
        if labels is not None:
            lab[i, sl] = torch.tensor(labels[i], dtype=torch.long)
    return ids, (lab if labels is not None else None), mask
