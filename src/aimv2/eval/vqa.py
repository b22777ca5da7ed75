"""Evaluating a VLM: answers generated for questions about images, scored as VQAv2 scores them; captions by CIDEr.

VQA accuracy follows the VQAv2 evaluation: answers are normalized (lower case, punctuation removed except inside
numbers, number words to digits, articles a / an / the dropped, common contractions restored, whitespace
collapsed) and an answer is right to the degree min(1, #references that say it / 3), averaged over the ten
leave-one-out subsets of the references. With a single reference (the built-in scenes, whose answers are exact)
that is exact match of the normalized answers.

CIDEr is pycocoevalcap's (the maintained reference implementation), on lower-cased, punctuation-stripped,
whitespace-split captions (its PTB tokenizer needs Java, which we do not require).
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np
import torch

from ..data.chat import answer_text, encode_prompt, pad_batch, pad_id, question_messages, stop_ids
from ..data.transforms import normalize

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {"dont": "don't", "doesnt": "doesn't", "isnt": "isn't", "arent": "aren't", "cant": "can't",
                "wont": "won't", "didnt": "didn't", "im": "i'm", "ive": "i've", "thats": "that's"}  # fmt: skip
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")  # a period not inside a number
_COMMA_NUM = re.compile(r"(\d),(\d)")


def normalize_answer(answer: str) -> str:
    """VQAv2's answer normalization (see the module docstring)."""
    a = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    a = _COMMA_NUM.sub(r"\1\2", a)
    a = _PERIOD.sub("", _PUNCT.sub(" ", a))
    words = []
    for w in a.split():
        w = NUMBER_WORDS.get(w, w)
        if w in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, references: list[str]) -> float:
    """VQAv2's accuracy of one answer against its references (exact match when there is one reference)."""
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    if len(refs) == 1:
        return float(pred == refs[0])
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1 :]
        scores.append(min(1.0, sum(r == pred for r in others) / 3))
    return sum(scores) / len(scores)


@torch.no_grad()
def answer(
    model, tokenizer, images: torch.Tensor, questions: list[str], *, mean_std="imagenet", max_new_tokens=24, **gen
) -> list[str]:
    """The model's answers to one question per image (uint8 [B, 3, H, W]); greedy unless ``do_sample=True``."""
    device = next(model.parameters()).device
    rows = [encode_prompt(tokenizer, question_messages(q)) for q in questions]
    ids, _, mask = pad_batch(rows, pad_id(tokenizer), left=True)
    stops = stop_ids(tokenizer)
    out = model.generate(
        normalize(images, mean_std, device),
        ids.to(device),
        mask.to(device),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id(tokenizer),
        eos_token_id=stops or None,
        **gen,
    )
    return [answer_text(tokenizer, o.tolist(), stops) for o in out]


def evaluate_vqa(model, tokenizer, samples, *, batch_size=32, mean_std="imagenet", progress=None) -> dict:
    """Accuracy over ``samples`` = [(kind, uint8 image [3, H, W], question, [references])]: {"accuracy", and
    "accuracy/KIND" per question type, "n", "examples": the first few (question, answer, references)}."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    examples = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        preds = answer(model, tokenizer, torch.stack([s[1] for s in chunk]), [s[2] for s in chunk], mean_std=mean_std)
        for (kind, _, q, refs), p in zip(chunk, preds, strict=True):
            by_kind[kind].append(vqa_accuracy(p, refs))
            if len(examples) < 8:
                examples.append({"question": q, "answer": p, "references": refs})
        if progress is not None:
            progress(len(chunk))
    scores = [s for v in by_kind.values() for s in v]
    out = {"accuracy": sum(scores) / max(1, len(scores)), "n": len(scores)}
    out.update({f"accuracy/{k}": sum(v) / len(v) for k, v in sorted(by_kind.items())})
    out["examples"] = examples
    return out


def cider(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr-D of captions against their references, by pycocoevalcap."""
    from pycocoevalcap.cider.cider import Cider

    def tok(s: str) -> str:
        return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())

    res = {i: [tok(p)] for i, p in enumerate(predictions)}
    gts = {i: [tok(r) for r in refs] for i, refs in enumerate(references)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def synthetic_vqa_samples(n_scenes: int, size: tuple[int, int], seed: int = 0) -> list[tuple]:
    """The held-out scenes' questions (one of every type a scene has) as evaluate_vqa's samples."""
    from ..data.synthetic.questions import heldout_questions, question_scene
    from ..data.synthetic.scenes import render

    out, images = [], {}
    for i, qa in heldout_questions(n_scenes, seed):
        if i not in images:
            img = np.asarray(render(question_scene(i, seed, "heldout")[0], size)).transpose(2, 0, 1)
            images[i] = torch.from_numpy(np.ascontiguousarray(img))
        out.append((qa.kind, images[i], qa.question, [qa.answer]))
    return out


def llava_vqa_samples(json_path, images, size: tuple[int, int], with_skipped: bool = False):
    """A LLaVA file as evaluate_vqa's samples: the first human turn is the question, the references are the
    record's ``answers`` (VQAv2's ten: strings, or VQAv2's ``{"answer": ...}`` objects) or else its first gpt turn;
    the type is ``question_type`` or "all". Records whose image is missing or unreadable are skipped (warned about,
    counted); text-only records (no ``image``) ask nothing about an image and are left out, counted apart. With
    ``with_skipped``: ``(samples, skipped, text_only)``."""
    from ..data.records import RecordAt, RecordError, field
    from ..data.sources.llava import LlavaConversations

    ds = LlavaConversations(json_path, images, size, max_fault_rate=1.0)
    out, skipped, text_only = [], 0, 0
    for i, rec in enumerate(ds.records):
        if "image" not in rec:  # LLaVA's mixes hold text-only conversations: no image question to score
            text_only += 1
            continue
        where = RecordAt(json_path, "", i)
        answers = field(rec, "answers", list, where=where, optional=True,
                        fix='give "answers" as a list of strings or of {"answer": ...} objects')  # fmt: skip
        refs = []
        for a in answers or []:
            a = a.get("answer") if isinstance(a, dict) else a
            if not isinstance(a, str):
                raise RecordError(f"'answers' holds a {type(a).__name__}, not a string or {{\"answer\": str}} "
                                  f"({where}); give the reference answers as text")  # fmt: skip
            refs.append(a)
        item = ds.get_item(i)
        if item is None:
            skipped += 1
            continue
        image, messages = item
        if not refs:
            refs = [m["content"] for m in messages if m["role"] == "assistant"][:1]
        if not refs:
            raise RecordError(f"no reference answer: neither 'answers' nor a gpt turn ({where}); give one of them")
        question = next(m["content"] for m in messages if m["role"] == "user").replace("<image>", "").strip()
        out.append((str(rec.get("question_type", "all")), image, question, refs))
    if not out:
        raise RecordError(
            f"no record of {json_path} has a readable image (skipped {skipped}, text-only {text_only}); "
            "check --images, and that the records name an 'image'"
        )
    return (out, skipped, text_only) if with_skipped else out


def evaluate_captions(model, tokenizer, samples, *, batch_size=32, mean_std="imagenet") -> dict:
    """CIDEr of the model's answers to ``samples`` (evaluate_vqa's: the question is the caption prompt, the
    references the captions) against their references: {"cider", "n", "examples"}."""
    preds = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        preds += answer(model, tokenizer, torch.stack([s[1] for s in chunk]), [s[2] for s in chunk],
                        mean_std=mean_std, max_new_tokens=96)  # fmt: skip
    refs = [s[3] for s in samples]
    examples = [{"caption": p, "references": r[:2]} for p, r in zip(preds[:4], refs[:4], strict=False)]
    return {"cider": cider(preds, refs), "n": len(preds), "examples": examples}
