"""``aimv2 vlm``: the encoder inside a vision-language model (LLaVA's recipe): train a stage, ask, evaluate."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .sub_actions import run_action

DESCRIPTION = """An encoder, a 2-layer MLP projector and a transformers causal LM from a local folder, trained
as LLaVA trains: stage 1 the projector only on image-caption pairs, stage 2 the projector and the LM on
instruction conversations; the encoder frozen (objectives/vlm.py). The image's tokens replace the <image>
placeholder of the prompt; the loss covers the answers (and their end-of-turn markup) only. Tested LM families
and templates: GPT-2, OPT, Llama (SentencePiece, no pad / no eos), Llama-3-style, Qwen2 ChatML, Qwen3-style
think, Gemma-style, Mistral [INST]-style, Phi-3-style, and the plain USER:/ASSISTANT: template of a tokenizer
without one.

actions:
  tiny-lm OUT                  write a tiny random Llama and a word-level tokenizer (tests, laptop demo)
  scene INDEX OUT.png          write held-out built-in scene INDEX and print its questions and answers
  train CONFIG [key=value]     train one stage (resumable: re-run the same command on the same out_dir)
  ask RUN IMAGE "question"     answer one question about an image (greedy, or --sample)
  eval RUN [--data FILE]       VQA accuracy per question type (held-out built-in scenes by default);
                               --captions: CIDEr of captions of held-out scenes (stage 1)
  export RUN OUT --to llava    a transformers LLaVA folder (model + processor) that from_pretrained loads

examples:
  aimv2 vlm tiny-lm runs/tiny-lm
  aimv2 vlm train configs/vlm-tiny-stage1.yaml vlm.encoder=runs/tiny-synthetic vlm.lm=runs/tiny-lm
  aimv2 vlm train configs/vlm-tiny-stage2.yaml vlm.encoder=runs/tiny-synthetic vlm.lm=runs/tiny-lm \\
      vlm.init_from=runs/vlm-stage1
  aimv2 vlm scene 3 scene.png --size 32
  aimv2 vlm ask runs/vlm-stage2 scene.png "What colour is the star?"
  aimv2 vlm eval runs/vlm-stage2 --scenes 200
  aimv2 vlm eval runs/vlm-stage2 --data vqa.json --images vqa-images/
  aimv2 vlm export runs/vlm-stage2 runs/vlm-stage2-llava --to llava

run `aimv2 vlm ACTION --help` for the options of each action."""

TRAIN_DESCRIPTION = """Train one VLM stage with the project's trainer (resume, DDP/FSDP2, bf16, metrics).

Outputs in out_dir: config.yaml, metrics.jsonl, checkpoints/, and vlm.safetensors (the weights the stage trains:
the projector, and the LM in stage 2; the frozen parts are read again from vlm.encoder and vlm.lm).
Data: vlm.data=synthetic (built-in scenes: captions in stage 1, questions in stage 2) or vlm.data=llava with
vlm.json=FILE vlm.images=DIR (LLaVA's conversation format; text-only records train without image tokens).
The LM's own chat template formats the text. Conversations longer than vlm.max_length lose whole answered turns
(vlm.truncation=drop_turns; =error stops instead); bad or missing images and conversations with no answer left
are skipped; all are counted in metrics.jsonl as data_skipped/<kind>.
Stage 2 with LoRA: vlm.lora.rank=R (vlm.lora.alpha, dropout, target_modules; peft) trains adapters instead of the
whole LM. vlm.train_encoder=true unfreezes the encoder, at optim.lr x vlm.encoder_lr_mult with its own warmup
(vlm.encoder_warmup_steps) and optional layer-wise decay (vlm.encoder_layer_decay); the tested recipe is
vlm.encoder_lr_mult=0.1 vlm.encoder_warmup_steps=50 (the defaults, 1.0 and 0, train it like the rest).

examples:
  aimv2 vlm train configs/vlm-tiny-stage1.yaml vlm.encoder=runs/tiny vlm.lm=runs/tiny-lm out_dir=runs/s1
  torchrun --nproc_per_node=2 -m aimv2 vlm train configs/vlm-tiny-stage2.yaml vlm.init_from=runs/s1 ...
  aimv2 vlm train configs/vlm-tiny-stage2.yaml vlm.lora.rank=8 vlm.init_from=runs/s1 ..."""

TINY_DESCRIPTION = """A tiny LlamaForCausalLM and a word-level tokenizer with a chat template, written with
save_pretrained: the LM of the tests and the laptop demo (nothing downloads). The tokenizer's vocabulary is the
built-in scenes' closed one (every word a caption, question or answer can hold), so an answer is one token; other
words read as <unk>. Use a real LM folder for real data."""

SCENE_DESCRIPTION = """Write held-out scene INDEX of the built-in data (the stream `aimv2 vlm eval` scores, never
trained on) as a PNG, and print every question about it that has an unambiguous answer, with the answer: something
to try `aimv2 vlm ask` on. Give --size the run's input size to see exactly the image the evaluation sees.

example:
  aimv2 vlm scene 3 scene.png --size 32"""

ASK_DESCRIPTION = """Answer a question about an image, generated with the LM's KV cache: greedy by default, sampled
with --sample. The image is resized to the run's input size (the tile grid at the encoder's resolution).

example:
  aimv2 vlm ask runs/vlm-stage2 scene.png "How many shapes are there?"
"""

EVAL_DESCRIPTION = """Greedy answers scored with VQAv2's answer normalization (case, punctuation, articles, number
words) and accuracy, per question type. The default data are the held-out built-in scenes (never trained on); --data
takes a LLaVA-format file (the first human turn is the question; the references are the record's "answers" list or
its first gpt turn; "question_type" groups the scores). --captions scores captions of held-out scenes with CIDEr
(pycocoevalcap). The last line of stdout is JSON.

examples:
  aimv2 vlm eval runs/vlm-stage2 --scenes 300
  aimv2 vlm eval runs/vlm-stage2 --data vqa.json --images vqa-images/
  aimv2 vlm eval runs/vlm-stage1 --captions"""

EXPORT_DESCRIPTION = """Write a VLM run as a transformers LlavaForConditionalGeneration folder with its LlavaProcessor
(image processor with the run's resize and mean/std, the tokenizer with <image> and a chat template, the image
token count): LlavaForConditionalGeneration / AutoProcessor / pipeline("image-text-to-text") load it with no code
of ours, and greedy answers equal `aimv2 vlm ask` token for token. The encoder is cut after the block the projector
reads and its hidden_states[-1] is made the normalized feature the projector trained on. Stage-1 runs export too.
An LM without a chat template gets one that renders the plain USER:/ASSISTANT: prompt the run trained on.
Tiled (vlm.tiles) and pooled (vlm.pool) runs do not export.

For images not at the run's input size, load the processor with backend="pil" to resize exactly as
`aimv2 vlm ask` does (transformers' default torchvision bicubic differs slightly).

example:
  aimv2 vlm export runs/vlm-stage2 runs/vlm-stage2-llava --to llava
  python -c "from transformers import pipeline; p = pipeline('image-text-to-text', 'runs/vlm-stage2-llava')"
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    fmt = argparse.RawDescriptionHelpFormatter

    t = sub.add_parser("tiny-lm", help="write a tiny random Llama + word-level tokenizer", formatter_class=fmt,
                       description=TINY_DESCRIPTION)  # fmt: skip
    t.add_argument("out", metavar="OUT", help="output folder")
    t.add_argument("--width", type=int, default=64, help="hidden size (default: 64)")
    t.add_argument("--depth", type=int, default=2, help="decoder layers (default: 2)")
    t.add_argument("--heads", type=int, default=2, help="attention heads (default: 2)")
    t.add_argument("--seed", type=int, default=0, help="init seed (default: 0)")
    t.add_argument("--overwrite", action="store_true", help="replace an LM folder already at OUT")
    t.set_defaults(_action=run_tiny_lm)

    c = sub.add_parser("scene", help="write a held-out scene and print its questions", formatter_class=fmt,
                       description=SCENE_DESCRIPTION)  # fmt: skip
    c.add_argument("index", metavar="INDEX", type=int, help="held-out scene index (0, 1, ...)")
    c.add_argument("out", metavar="OUT.png", help="output image file")
    c.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    c.add_argument("--seed", type=int, default=0, help="data seed, the run's `seed` (default: 0)")
    c.add_argument("--overwrite", action="store_true", help="replace OUT.png if it exists")
    c.set_defaults(_action=run_scene)

    p = sub.add_parser("train", help="train one stage from a YAML config", description=TRAIN_DESCRIPTION,
                       formatter_class=fmt)  # fmt: skip
    p.add_argument("config", help="YAML config (see configs/vlm-tiny-stage1.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. vlm.lm=runs/tiny-lm")
    p.add_argument("--quiet", action="store_true", help="only warnings and errors on stderr")
    p.set_defaults(_action=run_train)

    a = sub.add_parser("ask", help="answer a question about an image", formatter_class=fmt,
                       description=ASK_DESCRIPTION)  # fmt: skip
    a.add_argument("run", metavar="RUN", help="a VLM run folder (the out_dir of `aimv2 vlm train`)")
    a.add_argument("image", metavar="IMAGE", help="an image file")
    a.add_argument("question", metavar="QUESTION", help="the question (the <image> placeholder is added)")
    a.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    a.add_argument("--temperature", type=float, default=0.7, help="with --sample (default: 0.7)")
    a.add_argument("--top-p", type=float, default=0.9, help="with --sample (default: 0.9)")
    a.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (default: 32)")
    a.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    a.set_defaults(_action=run_ask)

    e = sub.add_parser("eval", help="VQA accuracy per question type (or CIDEr of captions)", formatter_class=fmt,
                       description=EVAL_DESCRIPTION)  # fmt: skip
    e.add_argument("run", metavar="RUN", help="a VLM run folder")
    e.add_argument("--data", metavar="FILE", help="a LLaVA-format question file (default: held-out built-in scenes)")
    e.add_argument("--images", metavar="DIR", help="with --data: the image folder")
    e.add_argument("--scenes", type=int, default=200, help="held-out built-in scenes (default: 200)")
    e.add_argument("--captions", action="store_true",
                   help="CIDEr of captions instead (of held-out scenes, or of --data's references)")  # fmt: skip
    e.add_argument("--batch-size", type=int, default=32, help="questions per generate call (default: 32)")
    e.add_argument("--out", metavar="JSON", help="also write the result to this file")
    e.set_defaults(_action=run_eval)

    x = sub.add_parser("export", help="a transformers LLaVA folder of a run", formatter_class=fmt,
                       description=EXPORT_DESCRIPTION)  # fmt: skip
    x.add_argument("run", metavar="RUN", help="a VLM run folder (the out_dir of `aimv2 vlm train`)")
    x.add_argument("out", metavar="OUT", help="the output folder")
    x.add_argument("--to", required=True, choices=("llava",), help="the format: llava (transformers' LLaVA)")
    x.add_argument("--overwrite", action="store_true", help="write into OUT even if it exists")
    x.set_defaults(_action=run_export)
    parser.set_defaults(_parser=parser)


run = run_action


def run_tiny_lm(args) -> int:
    from pathlib import Path

    from ..weights.lm import build_tiny_lm

    for name in ("width", "depth", "heads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.width % args.heads or (args.width // args.heads) % 2:
        raise ValueError(
            f"--width {args.width} must split into --heads {args.heads} heads of an even size (rotary position "
            "embeddings); e.g. --width 64 --heads 2"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT is a file, not a folder ({out}); give a folder path")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"OUT exists and is not empty ({out}); pass --overwrite to replace its LM")
    _quiet_lm_loading("")
    out = build_tiny_lm(out, width=args.width, depth=args.depth, heads=args.heads, seed=args.seed)
    print(f"tiny LM written to {out}")
    return 0


def run_scene(args) -> int:
    from pathlib import Path

    from ..data.synthetic.questions import question_scene, scene_questions
    from ..data.synthetic.scenes import render

    if args.index < 0:
        raise ValueError(f"INDEX must be >= 0, got {args.index}")
    if args.size < 8:
        raise ValueError(f"--size must be >= 8 pixels, got {args.size}")
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"OUT.png exists ({args.out}); pass --overwrite to replace it")
    spec, _ = question_scene(args.index, args.seed, "heldout")
    render(spec, args.size).save(args.out)
    print(f"held-out scene {args.index} written to {args.out} ({args.size} x {args.size})")
    for kind, qas in scene_questions(spec).items():
        for qa in qas:
            print(f"  {kind:<10} {qa.question:<45} {qa.answer}")
    return 0


def run_train(args) -> int:
    from ..config import load_config
    from ..config.vlm import VLMConfig, validate_vlm
    from ..train.vlm_task import train_vlm

    if args.quiet:
        logging.getLogger().setLevel(logging.WARNING)
    cfg = load_config(args.config, args.overrides, cls=VLMConfig)
    validate_vlm(cfg)
    _quiet_lm_loading("")
    if args.quiet:
        cfg.train.progress = False
    last = train_vlm(cfg)
    if last and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: step {last['step']} loss {last['loss']:.4f}; weights at {cfg.out_dir}/vlm.safetensors")
    return 0


def run_ask(args) -> int:
    import math

    import torch
    from PIL import Image

    from ..data.sources.llava import image_tensor
    from ..eval.vqa import answer
    from ..weights.lm import load_vlm_run

    if args.sample and not (0 < args.top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.sample and not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature must be a positive number, got {args.temperature}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tokenizer, cfg = load_vlm_run(_quiet_lm_loading(args.run))
    with Image.open(args.image) as img:
        image = image_tensor(img, model.image_size)
    _check_context(model, tokenizer, args.question, args.max_new_tokens)
    torch.manual_seed(args.seed)
    gen = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.sample else {}
    (text,) = answer(model, tokenizer, image[None], [args.question], mean_std=cfg.data.mean_std,
                     max_new_tokens=args.max_new_tokens, **gen)  # fmt: skip
    print(text)
    return 0


def run_eval(args) -> int:
    from tqdm import tqdm

    from ..eval.vqa import evaluate_captions, evaluate_vqa, llava_vqa_samples, synthetic_vqa_samples
    from ..weights.lm import load_vlm_run

    if args.scenes < 1 or args.batch_size < 1:
        raise ValueError(f"--scenes and --batch-size must be >= 1, got {args.scenes} and {args.batch_size}")
    if args.data and not args.images:
        raise FileNotFoundError("--data needs --images DIR (the folder its image paths are relative to)")
    if args.out:
        _check_writable(args.out)
    model, tokenizer, cfg = load_vlm_run(_quiet_lm_loading(args.run))
    skipped = text_only = 0
    if args.data:
        samples, skipped, text_only = llava_vqa_samples(args.data, args.images, model.image_size, with_skipped=True)
        if text_only:
            print(f"left out {text_only} text-only record(s) of {args.data}: no image to ask about", file=sys.stderr)
    if args.captions and not args.data:
        result = _captions(model, tokenizer, cfg, args)
    elif args.captions:
        result = evaluate_captions(model, tokenizer, samples, batch_size=args.batch_size, mean_std=cfg.data.mean_std)
    else:
        if not args.data:
            samples = synthetic_vqa_samples(args.scenes, model.image_size, seed=cfg.seed)
        with tqdm(total=len(samples), desc="vqa", file=sys.stderr) as bar:
            result = evaluate_vqa(model, tokenizer, samples, batch_size=args.batch_size,
                                  mean_std=cfg.data.mean_std, progress=bar.update)  # fmt: skip
    if args.data:
        result["skipped"] = skipped
        result["text_only"] = text_only
    for k, v in result.items():
        if k.startswith("accuracy") or k == "cider":
            print(f"{k:<22} {v:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


def _quiet_lm_loading(run: str) -> str:
    """Loading an LM prints transformers' progress bars and notes, and importing it torch's deprecation notes about
    its optional packages, around any error line: keep stderr for ours (and for real warnings)."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return run


def _check_writable(path: str) -> None:
    """Refuse an output path that cannot be written before the work, not after it."""
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--out is a folder ({p}); give a JSON file path")
    if not p.parent.is_dir():
        raise ValueError(f"the folder of --out does not exist ({p.parent}); create it first")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ValueError(f"--out cannot be written ({p}); give a writable path")


def _check_context(model, tokenizer, question: str, max_new_tokens: int) -> None:
    """A prompt (with the image's tokens) plus the answer must fit the LM's context."""
    from ..data.chat import encode_prompt, question_messages

    ctx = getattr(model.lm.config, "max_position_embeddings", None)
    need = len(encode_prompt(tokenizer, question_messages(question))) - 1 + model.tokens_per_image + max_new_tokens
    if ctx is not None and need > ctx:
        raise ValueError(
            f"the question, the image's {model.tokens_per_image} tokens and --max-new-tokens {max_new_tokens} need "
            f"{need} positions, more than the LM's context of {ctx}; shorten the question or lower --max-new-tokens"
        )


def _captions(model, tokenizer, cfg, args) -> dict:
    """Captions of the first --scenes held-out scenes against 5 generated reference captions each: CIDEr."""
    import numpy as np
    import torch

    from ..data.synthetic.captions import caption
    from ..data.synthetic.questions import CAPTION_PROMPT, question_scene
    from ..data.synthetic.scenes import render
    from ..eval.vqa import answer, cider

    preds, refs = [], []
    prompt = CAPTION_PROMPT.replace("<image>\n", "")
    for start in range(0, args.scenes, args.batch_size):
        idx = range(start, min(args.scenes, start + args.batch_size))
        specs = [question_scene(i, cfg.seed, "heldout")[0] for i in idx]
        images = torch.stack([torch.from_numpy(np.asarray(render(s, model.image_size)).transpose(2, 0, 1).copy())
                              for s in specs])  # fmt: skip
        preds += answer(model, tokenizer, images, [prompt] * len(specs), mean_std=cfg.data.mean_std, max_new_tokens=96)
        for s, i in zip(specs, idx, strict=True):
            refs.append([caption(s, np.random.default_rng([cfg.seed, 9, i, r])) for r in range(5)])
    examples = [{"caption": p, "references": r[:2]} for p, r in zip(preds[:4], refs[:4], strict=False)]
    return {"cider": cider(preds, refs), "n": len(preds), "examples": examples}


def run_export(args) -> int:
    from pathlib import Path

    from ..weights.llava_export import export_llava

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to write into it, or choose another OUT")
    export_llava(args.run, out)
    print(f"LLaVA folder written to {out}: transformers.LlavaForConditionalGeneration.from_pretrained({str(out)!r})")
    return 0
