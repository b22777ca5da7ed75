"""What a VLM can score on the built-in held-out questions without looking at the image: the floor of
vlm_compare.py's table.

Why: a tiny LM trained on question conversations first learns the answer distribution of each question. Whatever
an encoder adds must show above this: for every question text (e.g. "What colour is the star?"), the answer most
frequent in the training scenes, scored on the held-out questions exactly as vlm_compare.py scores them (VQAv2
accuracy, per question type; a question never seen in training gets the most frequent answer of its type).

    python benchmarks/vqa_blind.py [--train-scenes 20000] [--scenes 100] [--out benchmarks/results/vqa_blind.json]
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict
from pathlib import Path

from aimv2.data.synthetic.questions import heldout_questions, question_scene, scene_questions
from aimv2.eval.vqa import vqa_accuracy

ROOT = Path(__file__).resolve().parents[1]


def most_frequent_answers(train_scenes: int, seed: int = 0) -> tuple[dict[str, str], dict[str, str]]:
    """({question: its most frequent training answer}, {type: the most frequent answer of that type})."""
    by_question: dict[str, Counter] = defaultdict(Counter)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for i in range(train_scenes):
        spec, _ = question_scene(i, seed, "train")
        for kind, qas in scene_questions(spec).items():
            for qa in qas:
                by_question[qa.question][qa.answer] += 1
                by_kind[kind][qa.answer] += 1
    top = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    return top, {k: c.most_common(1)[0][0] for k, c in by_kind.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-scenes", type=int, default=20000, help="training scenes the answer counts come from")
    p.add_argument("--scenes", type=int, default=100, help="held-out scenes scored (vlm_compare.py's --scenes)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/vqa_blind.json"))
    args = p.parse_args()
    from machine import machine_info

    top, top_kind = most_frequent_answers(args.train_scenes)
    scores: dict[str, list[float]] = defaultdict(list)
    for _, qa in heldout_questions(args.scenes):
        scores[qa.kind].append(vqa_accuracy(top.get(qa.question, top_kind[qa.kind]), [qa.answer]))
    every = [s for v in scores.values() for s in v]
    result = {"accuracy": round(sum(every) / len(every), 4), "n": len(every)}
    result |= {f"accuracy/{k}": round(sum(v) / len(v), 4) for k, v in sorted(scores.items())}
    record = {
        "machine": machine_info(),
        "args": vars(args) | {"out": os.path.relpath(args.out, ROOT)},
        "result": result,
    }
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
