"""Recorded check of `aimv2 vlm export --to llava`: greedy answers of transformers' own LLaVA on the exported folder
against `aimv2 vlm ask`'s (eval.vqa.answer), question by question on held-out built-in scenes, for two LM families:
the tiny Llama of `aimv2 vlm tiny-lm` (a chat template) and a tiny GPT-2 with a byte-level BPE (none). Each is
trained a short stage 2 first (random encoder, CPU), then exported and loaded with no code of ours.

    python benchmarks/vlm_export_check.py --scenes 20 --out benchmarks/results/vlm_export_check.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import transformers as tf
from PIL import Image

from aimv2.config import load_config
from aimv2.config.vlm import VLMConfig
from aimv2.data.synthetic.questions import text_words
from aimv2.eval.vqa import answer, synthetic_vqa_samples, vqa_accuracy
from aimv2.train.vlm_task import train_vlm
from aimv2.weights import create_model, save_encoder
from aimv2.weights.llava_export import export_llava
from aimv2.weights.lm import build_tiny_lm, load_vlm_run

ROOT = Path(__file__).resolve().parents[1]


def tiny_gpt2(out: Path) -> Path:
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    text = [" ".join(sorted(text_words()))] * 4 + ["USER: ASSISTANT: Describe the image."]
    bpe.train_from_iterator(
        text, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False
    )
    end = "<|endoftext|>"
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=end, eos_token=end, unk_token=end)
    cfg = tf.GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def check(run: Path, folder: Path, scenes: int) -> dict:
    model, tok, cfg = load_vlm_run(run)
    llava = tf.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    proc = tf.AutoProcessor.from_pretrained(folder, backend="pil")
    samples = synthetic_vqa_samples(scenes, model.image_size, seed=cfg.seed)
    rows, same, acc = [], 0, 0.0
    for _, img, q, refs in samples:
        ours = answer(model, tok, img[None], [q], mean_std=cfg.data.mean_std, max_new_tokens=16)[0]
        msgs = [{"role": "user", "content": f"<image>\n{q}"}]
        prompt = proc.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inputs = proc(images=Image.fromarray(img.permute(1, 2, 0).numpy()), text=prompt, return_tensors="pt",
                      add_special_tokens=False)  # fmt: skip
        with torch.no_grad():
            out = llava.generate(**inputs, max_new_tokens=16, do_sample=False)
        theirs = proc.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        same += ours == theirs
        acc += vqa_accuracy(ours, refs)
        rows.append({"question": q, "aimv2_ask": ours, "transformers_llava": theirs, "reference": refs[0]})
    return {"questions": len(samples), "identical": same, "vqa_accuracy": acc / len(samples), "answers": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=20, help="held-out scenes (one question of each type per scene)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {"scenes": args.scenes, "steps": args.steps, "transformers": tf.__version__, "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        torch.manual_seed(1)
        save_encoder(create_model("aimv2-tiny-patch8-64", depth=2, img_size=16), d / "encoder.safetensors")
        lms = {"llama (chat template)": build_tiny_lm(d / "llama"), "gpt2 (no chat template)": tiny_gpt2(d / "gpt2")}
        for i, (family, lm) in enumerate(lms.items()):
            run = d / f"run{i}"
            overrides = [f"vlm.encoder={d / 'encoder.safetensors'}", "vlm.encoder_overrides={depth: 2, img_size: 16}",
                         f"vlm.lm={lm}", f"out_dir={run}", "vlm.max_length=96", "train.batch_size=16",
                         f"train.steps={args.steps}", f"train.checkpoint_every={args.steps}", "optim.warmup_steps=10",
                         "train.progress=false", "data.num_workers=0", "log.tensorboard=false"]  # fmt: skip
            train_vlm(load_config(ROOT / "configs/vlm-tiny-stage2.yaml", overrides, VLMConfig))
            export_llava(run, d / f"llava{i}")
            r = check(run, d / f"llava{i}", args.scenes)
            print(f"{family:<26} identical {r['identical']}/{r['questions']}  vqa accuracy {r['vqa_accuracy']:.3f}")
            result["families"][family] = r
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
