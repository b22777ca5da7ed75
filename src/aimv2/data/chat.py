"""Conversations as a VLM trains on them: the LM's chat template, labels on the answers only, padded batches.

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": str}``; one user
message holds the ``<image>`` placeholder (none: a text-only sample). It is rendered with the tokenizer's own chat
template when it has one, else with the plain template below.

Labels come from tokens, built turn by turn as LLaVA and TRL build their sequences: for assistant turn k the
template's generation prompt ``render(messages[:k], add_generation_prompt=True)`` and the rendered turn
``render(messages[:k + 1])``; the turn's *answer* is what the second adds to the first (the answer and the
template's end-of-turn markup, e.g. `` red</s>\\n``, ``red<|im_end|>\\n``, or with a Qwen3-style template the
empty think block the LM writes before it). The sample's tokens are, per answered turn, the tokens of its prompt
(the text that follows the previous answer: user turns, role markers, the placeholder; unlabelled) then the
tokens of its answer (labelled). So:

- the tokens before the first answer are exactly :func:`encode_prompt` of its question, what ``vlm ask`` and
  ``vlm eval`` give the LM, and every answer token, the first included, carries a label;
- each piece is tokenized in context (the last 64 characters before it plus the piece, tokens past those of the
  context alone), so a byte-level BPE sees `` red`` as it would in the whole text; where a tokenizer merges across
  the seam (rare), the piece is tokenized on its own, and the seam stays where inference puts it;
- a template that renders earlier assistant turns differently from the last one (Qwen3 drops their think
  blocks) keeps every answer as it was trained; the prompt of the next turn is what the template puts after the
  previous answer.

The plain template (a tokenizer with no ``chat_template``)::

    {bos}USER: {user}\\nASSISTANT: {answer}{eos}\\n   ... one pair per turn; a prompt ends with "ASSISTANT:"

(no trailing space: the space belongs to the answer's first token, as byte-level BPE and SentencePiece read it).

Truncation (``vlm.truncation``): ``drop_turns`` keeps the longest run of whole answered turns that fits
``max_length`` tokens and drops the rest (never half an answer); a conversation whose first answer does not fit
keeps nothing and is skipped by the reader. ``error`` stops instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config.vlm import TRUNCATION

IGNORE = -100
IMAGE_TOKEN = "<image>"
_SENTINEL = "\u2063aimv2-answer\u2063"  # stands in for an answer to find where its turn ends in another render


def plain_template(messages: list[dict], add_generation_prompt: bool, bos: str, eos: str) -> str:
    parts = [bos]
    for m in messages:
        if m["role"] == "system":
            parts.append(f"{m['content']}\n")
        elif m["role"] == "user":
            parts.append(f"USER: {m['content']}\n")
        else:
            parts.append(f"ASSISTANT: {m['content']}{eos}\n")
    if add_generation_prompt:
        parts.append("ASSISTANT:")
    return "".join(parts)


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the LM reads it: its chat template, or the plain one."""
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except TemplateError as e:  # the template's raise_exception (roles that must alternate, no system turn ...)
            roles = "/".join(m["role"] for m in messages)
            raise ValueError(
                f"the LM's chat template refuses a conversation of roles {roles} ({e}); give conversations it "
                "accepts (e.g. without a system turn) or an LM whose template does"
            ) from e
    return plain_template(messages, add_generation_prompt, tokenizer.bos_token or "", tokenizer.eos_token or "")


def question_messages(question: str, image: bool = True) -> list[dict]:
    """The one-question conversation that ``vlm ask`` / ``vlm eval`` prompt with (the placeholder first)."""
    return [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}" if image else question}]


def tokenize(tokenizer, text: str) -> list[int]:
    """Token ids of text that already holds its special tokens (the template's bos included)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation up to the answer the model is to write (the generation prompt)."""
    return tokenize(tokenizer, render(tokenizer, messages, add_generation_prompt=True))


CONTEXT_CHARS = 64  # the text before a piece that its tokenization sees (seams are local: pre-tokenizers split)


def _in_context(tokenizer, text: str, piece: str) -> list[int]:
    """The tokens ``piece`` adds after ``text``: those of (the end of ``text`` + ``piece``) past the tokens of the
    end of ``text`` alone, when the first start with the second; else (the piece merges across the seam) the
    piece's own tokens."""
    if not piece:
        return []
    if not text:
        return tokenize(tokenizer, piece)
    before = text[-CONTEXT_CHARS:]
    alone = tokenize(tokenizer, before)
    whole = tokenize(tokenizer, before + piece)
    if len(whole) > len(alone) and whole[: len(alone)] == alone:
        return whole[len(alone) :]
    return tokenize(tokenizer, piece)


def _after_previous_answer(tokenizer, messages: list[dict], prev: int, k: int, answer_text: str) -> str:
    """What the template renders between assistant turn ``prev`` and the generation prompt of turn ``k``, for a
    template whose rendering of ``messages[:k]`` does not extend the text built so far (it renders earlier
    assistant turns otherwise than the last one). Found with a sentinel in place of turn ``prev``'s content."""
    content = messages[prev]["content"]
    at = answer_text.rfind(content) if content else -1
    tail = answer_text[at + len(content) :] if at >= 0 else ""  # the turn's closing markup, e.g. "<|im_end|>\n"
    probe = [dict(m, content=_SENTINEL) if i == prev else m for i, m in enumerate(messages[:k])]
    text = render(tokenizer, probe, add_generation_prompt=True)
    end = text.find(_SENTINEL)
    if at < 0 or end < 0 or not text[end + len(_SENTINEL) :].startswith(tail):
        raise ValueError(
            f"the chat template renders assistant turn {prev} inside the prompt of turn {k} in a way whose end "
            "cannot be found (its answer or closing markup changes); give the LM a template whose rendering of a "
            "conversation extends the rendering of its first turns"
        )
    return text[end + len(_SENTINEL) + len(tail) :]


def conversation_turns(tokenizer, messages: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of every assistant turn, in order: the conversation's tokens are their
    concatenation, and the answers are what is labelled (see the module docstring). Messages after the last
    assistant turn are left out (nothing to learn from them)."""
    turns: list[tuple[list[int], list[int]]] = []
    text = ""
    prev, prev_answer = None, ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:k], add_generation_prompt=True)
        full = render(tokenizer, messages[: k + 1])
        if not full.startswith(prompt):
            raise ValueError(
                f"the chat template's generation prompt is not the start of the rendered assistant turn {k} "
                f"({prompt[-40:]!r} vs {full[len(prompt) - 40 : len(prompt)]!r}): its labels cannot be found; "
                "give the LM a template whose add_generation_prompt opens the assistant turn"
            )
        if prev is None or prompt.startswith(text):
            before = prompt[len(text) :]
        else:
            before = _after_previous_answer(tokenizer, messages, prev, k, prev_answer)
        answer = full[len(prompt) :]
        p = _in_context(tokenizer, text, before)  # the first turn's: its whole prompt, exactly as encode_prompt's
        text = text + before
        a = _in_context(tokenizer, text, answer)
        text = text + answer
        turns.append((p, a))
        prev, prev_answer = k, answer
    return turns


@dataclass
class Encoded:
    """One conversation as a training sample: token ids and labels (-100 off the answers), and how many answered
    turns it had and lost to ``max_length``. ``ids`` is empty when not even the first answer fits."""

    ids: list[int]
    labels: list[int]
    answers: int  # answered turns kept (labelled)
    dropped: int  # answered turns dropped for max_length


def encode_turns(tokenizer, messages: list[dict], max_length: int, truncation: str = "drop_turns") -> Encoded:
    """The conversation's tokens and labels, whole answered turns only, at most ``max_length`` tokens."""
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION)}, got {truncation!r}")
    ids: list[int] = []
    labels: list[int] = []
    turns = conversation_turns(tokenizer, messages)
    kept = 0
    for p, a in turns:
        if len(ids) + len(p) + len(a) > max_length:
            if truncation == "error":
                raise ValueError(
                    f"a conversation needs more than vlm.max_length={max_length} tokens (answered turn {kept + 1} "
                    f"ends at token {len(ids) + len(p) + len(a)}); raise vlm.max_length or set "
                    "vlm.truncation=drop_turns"
                )
            break
        ids += p + a
        labels += [IGNORE] * len(p) + list(a)
        kept += 1
    return Encoded(ids, labels, kept, len(turns) - kept)


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one conversation: :func:`encode_turns` with whole turns dropped past ``max_length``."""
    e = encode_turns(tokenizer, messages, max_length)
    return e.ids, e.labels


def pad_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad, else its eos, else 0 (padding is masked out anyway)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def stop_ids(tokenizer) -> list[int]:
    """The ids that end an answer at generation: eos, and the first token of the template's end-of-turn markup
    (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``; the newline of the plain template without eos)."""
    out = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    q = question_messages("x", image=False)
    prompt = render(tokenizer, q, add_generation_prompt=True)
    full = render(tokenizer, [*q, {"role": "assistant", "content": "x"}])
    answer = full[len(prompt) :] if full.startswith(prompt) else ""
    at = answer.rfind("x")
    if at >= 0 and answer[at + 1 :]:
        head = tokenize(tokenizer, prompt + answer[: at + 1])
        whole = tokenize(tokenizer, prompt + answer)
        if len(whole) > len(head) and whole[: len(head)] == head and whole[len(head)] not in out:
            out.append(int(whole[len(head)]))
    return out


_THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


def answer_text(tokenizer, ids: list[int], stops: list[int]) -> str:
    """The text of generated ``ids`` up to the first stop id, special tokens and an empty or whole leading think
    block (``<think>...</think>``) left out."""
    for i, t in enumerate(ids):
        if int(t) in stops:
            ids = ids[:i]
            break
    return _THINK.sub("", tokenizer.decode(ids, skip_special_tokens=True)).strip()


def pad_batch(rows: list[list[int]], pad_id: int, *, labels: list[list[int]] | None = None, left: bool = False):
    """Right- (training) or left- (generation) padded (ids [B, T], labels [B, T] or None, attention_mask [B, T])."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), 0 if pad_id is None else pad_id, dtype=torch.long)
    lab = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
        if labels is not None:
            lab[i, sl] = torch.tensor(labels[i], dtype=torch.long)
    return ids, (lab if labels is not None else None), mask
