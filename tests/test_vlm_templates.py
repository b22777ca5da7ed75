"""VLM labels on the tokenizers and chat templates people use, each LM tiny and random and built here (nothing
downloads): byte-level BPE (GPT-2, OPT, Phi, a Llama-3-style and ChatML templates; `trim_offsets` on and off)
and SentencePiece (Llama, Gemma-style, Mistral [INST]-style), with and without pad / eos / chat template, and a
Qwen3-style template that renders earlier answers without their think block.

For each: the labelled tokens are the answers and their end-of-turn markup (read back token by token from the
vocabulary, by hand), changing the prompts leaves them unchanged, the prompt `vlm ask` gives the LM is where the
training sequence starts, and the loss is a per-sample cross-entropy computed by hand. Three families also learn
one repeated sample and answer it through `vlm ask`'s code."""

import re
from dataclasses import dataclass
from functools import cache

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from aimv2.data.chat import (
    IGNORE,
    encode_conversation,
    encode_prompt,
    encode_turns,
    pad_batch,
    pad_id,
    question_messages,
)
from aimv2.eval.vqa import answer
from aimv2.objectives.vlm import VisionLanguageModel
from aimv2.weights import create_model
from aimv2.weights.lm import IMAGE_TOKEN, prepare_tokenizer

WORDS = (
    "what colour is the star ? how many shapes are there red blue green 3 two describe image a on square circle "
    "USER ASSISTANT : system user assistant model You are helpful . [INST] [/INST] think"
).split()
CORPUS = [" ".join(WORDS[i : i + 7]) for i in range(len(WORDS))] * 5 + ["USER: x\nASSISTANT: red\n"] * 5

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
    "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN3 = (  # Qwen3's rule: the think block only on an assistant turn after the last user turn that ends the chat
    "{%- set ns = namespace(last=-1) -%}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
    "{%- set ns.last = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}"
    "{%- if loop.index0 > ns.last and loop.last -%}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- else -%}{{ '<|im_start|>assistant\n' + m['content'] + '<|im_end|>\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
)
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest, and spares a machine whose cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE), written out here."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_OF = {c: b for b, c in bytes_to_unicode().items()}


def surface(tok, ids: list[int]) -> str:
    """The text of tokens read from the vocabulary by hand: byte-level characters back to bytes, SentencePiece's
    '▁' to a space and its <0xNN> byte tokens to their byte; special and added tokens as they are written."""
    out = []
    added = {t.content for t in tok.added_tokens_decoder.values()}
    for piece in tok.convert_ids_to_tokens(ids):
        if piece in added:
            out.append(piece)
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            out.append(chr(int(piece[3:5], 16)))
        elif "▁" in piece or isinstance(tok, tf.LlamaTokenizer):
            out.append(piece.replace("▁", " "))
        else:
            out.append(bytes(BYTE_OF[c] for c in piece).decode())
    return "".join(out)


def byte_level(specials: list[str], *, trim_offsets: bool, **names) -> tf.PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=core, **names)


@cache
def _spm_dir(tmp: str) -> str:
    import io
    from pathlib import Path

    import sentencepiece as spm

    f = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_writer=f, vocab_size=300,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)  # fmt: skip
    (Path(tmp) / "tokenizer.model").write_bytes(f.getvalue())
    return tmp


def sentencepiece(tmp, specials=(), **names) -> tf.LlamaTokenizer:
    tok = tf.LlamaTokenizer.from_pretrained(_spm_dir(str(tmp)), legacy=False, **names)
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    return tok


def _lm(config_cls, tok, **kw):
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=len(tok), **kw)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()  # no dropout: losses compared exactly


LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip


@dataclass
class Family:
    tokenizer: object  # (tmp) -> tokenizer
    template: str | None
    label: object  # answer -> the text its labels must cover (the answer and the turn's closing markup)
    lm: object  # tokenizer -> a tiny random causal LM
    system: bool = False


FAMILIES = {
    "gpt2": Family(
        lambda t: byte_level(
            ["<|endoftext|>"], trim_offsets=True, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
        ),  # fmt: skip
        None,
        lambda a: f" {a}<|endoftext|>\n",
        lambda tok: _lm(tf.GPT2Config, tok, n_embd=32, n_layer=1, n_head=2, n_positions=256),
    ),
    "opt": Family(
        lambda t: byte_level(
            ["<pad>", "</s>"], trim_offsets=False, bos_token="</s>", eos_token="</s>", pad_token="<pad>"
        ),  # fmt: skip
        None,
        lambda a: f" {a}</s>\n",
        lambda tok: _lm(
            tf.OPTConfig,
            tok,
            hidden_size=32,
            num_hidden_layers=1,
            ffn_dim=64,
            num_attention_heads=2,
            max_position_embeddings=256,
            word_embed_proj_dim=32,
        ),  # fmt: skip
    ),
    "llama-sp-no-pad-no-eos": Family(
        lambda t: sentencepiece(t, eos_token=None),
        None,
        lambda a: f" {a}\n",
        lambda tok: _lm(tf.LlamaConfig, tok, **LLAMA_LIKE),
    ),
    "llama3-bpe": Family(
        lambda t: byte_level(
            ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
            trim_offsets=True,
            bos_token="<|begin_of_text|>",
            eos_token="<|end_of_text|>",
        ),  # fmt: skip
        LLAMA3,
        lambda a: f"{a}<|eot_id|>",
        lambda tok: _lm(tf.LlamaConfig, tok, **LLAMA_LIKE),
    ),
    "qwen2-chatml-system": Family(
        lambda t: byte_level(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            trim_offsets=False,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
        ),  # fmt: skip
        CHATML,
        lambda a: f"{a}<|im_end|>\n",
        lambda tok: _lm(tf.Qwen2Config, tok, **LLAMA_LIKE),
        system=True,
    ),
    "qwen3-think": Family(
        lambda t: byte_level(
            ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
            trim_offsets=False,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
        ),  # fmt: skip
        QWEN3,
        lambda a: f"<think>\n\n</think>\n\n{a}<|im_end|>\n",
        lambda tok: _lm(tf.Qwen3Config, tok, head_dim=16, **LLAMA_LIKE),
    ),
    "gemma-sp": Family(
        lambda t: sentencepiece(t, ["<start_of_turn>", "<end_of_turn>"], pad_token="<pad>"),
        GEMMA,
        lambda a: f"{a}<end_of_turn>\n",
        lambda tok: _lm(tf.GemmaConfig, tok, head_dim=16, **LLAMA_LIKE),
    ),
    "mistral-inst-sp": Family(
        lambda t: sentencepiece(t),
        MISTRAL,
        lambda a: f" {a}</s>",
        lambda tok: _lm(tf.MistralConfig, tok, **LLAMA_LIKE),
    ),
    "phi": Family(
        lambda t: byte_level(
            ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
            trim_offsets=True,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
        ),  # fmt: skip
        PHI3,
        lambda a: f"{a}<|end|>\n",
        lambda tok: _lm(
            tf.PhiConfig,
            tok,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=256,
        ),  # fmt: skip
    ),
}


@pytest.fixture(scope="module")
def spm_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("spm")


def tokenizer_of(name, spm_tmp):
    fam = FAMILIES[name]
    tok = fam.tokenizer(spm_tmp)
    tok.chat_template = fam.template
    return prepare_tokenizer(tok)


def conversation(family: Family, q1="What colour is the star?", q2="How many shapes are there?", system=None):
    msgs = [{"role": "system", "content": system or "You are helpful."}] if family.system else []
    return msgs + [
        {"role": "user", "content": f"{IMAGE_TOKEN}\n{q1}"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": q2},
        {"role": "assistant", "content": "3"},
    ]


def labelled_runs(ids, labels) -> list[list[int]]:
    runs, run = [], []
    for t, lab in zip(ids, labels, strict=True):
        if lab != IGNORE:
            assert lab == t
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


@pytest.mark.parametrize("name", list(FAMILIES))
def test_labels_are_the_answers_and_their_turn_end(name, spm_tmp):
    fam = FAMILIES[name]
    tok = tokenizer_of(name, spm_tmp)
    ids, labels = encode_conversation(tok, conversation(fam), 512)
    runs = labelled_runs(ids, labels)
    assert [surface(tok, r) for r in runs] == [fam.label("red"), fam.label("3")]
    # other questions (and another system prompt) before the answers: the same labelled tokens
    other = conversation(fam, "Describe the image, please.", "Is it a square or a circle?", "You are a model.")
    assert labelled_runs(*encode_conversation(tok, other, 512)) == runs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_prompt_vlm_ask_gives_is_where_training_starts(name, spm_tmp):
    """The tokens before the first answer are exactly the generation prompt of its question, and the first token
    after them is labelled (the answer's first token learns from exactly the context inference gives it)."""
    fam = FAMILIES[name]
    tok = tokenizer_of(name, spm_tmp)
    msgs = conversation(fam)
    ids, labels = encode_conversation(tok, msgs, 512)
    first_user = next(i for i, m in enumerate(msgs) if m["role"] == "user")
    prompt = encode_prompt(tok, msgs[: first_user + 1])
    if not fam.system:
        assert prompt == encode_prompt(tok, question_messages("What colour is the star?"))
    assert ids[: len(prompt)] == prompt
    assert all(lab == IGNORE for lab in labels[: len(prompt)]) and labels[len(prompt)] != IGNORE


@pytest.mark.parametrize("name", ["gpt2", "qwen2-chatml-system", "qwen3-think", "gemma-sp", "phi"])
def test_whole_turns_are_dropped_past_max_length(name, spm_tmp):
    fam = FAMILIES[name]
    tok = tokenizer_of(name, spm_tmp)
    full = encode_turns(tok, conversation(fam), 512)
    assert (full.answers, full.dropped) == (2, 0)
    cut = encode_turns(tok, conversation(fam), len(full.ids) - 1)  # the second answer would lose its end
    assert (cut.answers, cut.dropped) == (1, 1) and cut.ids == full.ids[: len(cut.ids)]
    assert [surface(tok, r) for r in labelled_runs(cut.ids, cut.labels)] == [fam.label("red")]
    assert cut.labels[-1] != IGNORE  # it ends with the kept answer's closing markup: nothing half
    none = encode_turns(tok, conversation(fam), 3)
    assert (none.ids, none.answers, none.dropped) == ([], 0, 2)
    with pytest.raises(ValueError, match="vlm.max_length=3"):
        encode_turns(tok, conversation(fam), 3, truncation="error")


def _vlm(lm, tok):
    enc = create_model("aimv2-tiny-patch8-64", depth=1, img_size=16)
    return VisionLanguageModel(enc, lm, tok.convert_tokens_to_ids(IMAGE_TOKEN), stage=2)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_loss_is_a_per_sample_cross_entropy_by_hand(name, spm_tmp):
    fam = FAMILIES[name]
    tok = tokenizer_of(name, spm_tmp)
    model = _vlm(fam.lm(tok), tok)
    rows, labs = [], []
    for q in ("What colour is the star?", "Describe the image a red star on a blue square. How many?"):
        ids, lab = encode_conversation(tok, conversation(fam, q), 512)
        rows.append(ids)
        labs.append(lab)
    ids, labels, mask = pad_batch(rows, pad_id(tok), labels=labs)
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 16)
    out = model(images, ids, labels, mask)
    total, n = 0.0, 0
    with torch.no_grad():
        feats = model.projector(model.image_features(images))  # [2, K, D]
        for b, row in enumerate(rows):
            t = torch.tensor(row)
            p = row.index(model.image_token_id)
            emb = model.lm.get_input_embeddings()(t.masked_fill(t == model.image_token_id, 0))
            seq = torch.cat([emb[:p], feats[b], emb[p + 1 :]])[None]  # alone, no padding
            logp = F.log_softmax(model.lm(inputs_embeds=seq).logits[0].double(), -1)
            targets = labs[b][:p] + [IGNORE] * feats.shape[1] + labs[b][p + 1 :]  # labels as the sequence lies
            for i in range(1, len(targets)):
                if targets[i] != IGNORE:
                    total -= logp[i - 1, targets[i]].item()
                    n += 1
    assert n == int(out.terms.counts["text_loss"]) == sum(lab != IGNORE for r in labs for lab in r)
    assert out.loss.item() == pytest.approx(total / n, rel=1e-4)


STEPS = 60  # 40 left the Qwen3-style LM one step short of "red" for some inits (seeded now; 60 learns it for seeds 0-3)


@pytest.mark.parametrize("name", ["gpt2", "qwen3-think", "llama-sp-no-pad-no-eos"])
def test_the_lm_learns_one_sample_and_ask_answers_it(name, spm_tmp):
    """A few steps on one repeated sample: `vlm ask`'s code (answer) then says the answer, and stops."""
    fam = FAMILIES[name]
    tok = tokenizer_of(name, spm_tmp)
    torch.manual_seed(0)  # the encoder's and the LM's random init: what the steps below start from
    model = _vlm(fam.lm(tok), tok)
    msgs = conversation(fam)[: 3 if fam.system else 2]
    ids, lab = encode_conversation(tok, msgs, 512)
    ids, labels, mask = pad_batch([ids], pad_id(tok), labels=[lab])
    image = torch.full((1, 3, 16, 16), 128, dtype=torch.uint8)
    from aimv2.data.transforms import normalize

    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        model(normalize(image, "imagenet", torch.device("cpu")), ids, labels, mask).loss.backward()
        opt.step()
    model.eval()
    (said,) = answer(model, tok, image, ["What colour is the star?"], max_new_tokens=8)
    assert said == "red"


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_answer_follows_its_turns_generation_prompt(name, spm_tmp):
    """Answer k comes after the text the template renders as the generation prompt of turn k (read back from the
    tokens by hand; SentencePiece's dummy-prefix spaces aside); with the Qwen3-style template the earlier answer
    keeps the think block it was trained with, and what follows it is the template's next user turn and prompt."""
    from aimv2.data.chat import render

    fam = FAMILIES[name]
    tok = tokenizer_of(name, spm_tmp)
    msgs = conversation(fam)
    ids, labels = encode_conversation(tok, msgs, 512)
    starts = [i for i in range(len(ids)) if labels[i] != IGNORE and (i == 0 or labels[i - 1] == IGNORE)]
    answers = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    assert len(starts) == len(answers) == 2
    for start, k in zip(starts, answers, strict=True):
        expected = render(tok, msgs[:k], add_generation_prompt=True)
        if name == "qwen3-think" and k == answers[1]:  # the first answer as trained: with its (empty) think block
            expected = expected.replace("assistant\nred", "assistant\n<think>\n\n</think>\n\nred")
        assert surface(tok, ids[:start]).replace(" ", "") == expected.replace(" ", "")


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "qwen3-think"])
def test_a_long_conversation_is_tokenized_as_its_whole_text(name, spm_tmp):
    """Built piece by piece, a template that extends its renders gives the tokens of the whole rendered text,
    tokenized at once (the seams add nothing), on a six-answer conversation longer than the context window the
    pieces are tokenized with."""
    from aimv2.data.chat import render, tokenize

    fam = FAMILIES[name]
    tok = tokenizer_of(name, spm_tmp)
    more = [{"role": "user", "content": "How many shapes are there? " * 3},
            {"role": "assistant", "content": "There are three shapes: a red star and a blue square. " * 2}]  # fmt: skip
    msgs = conversation(fam) + more * 4
    assert encode_conversation(tok, msgs, 4096)[0] == tokenize(tok, render(tok, msgs))


def test_a_conversation_the_template_refuses_is_one_clear_error(spm_tmp):
    """Gemma's and Mistral's templates raise on roles they do not take (a system turn, roles that do not
    alternate): a ValueError naming the roles, not jinja's exception."""
    from aimv2.data.chat import render

    tok = tokenizer_of("gemma-sp", spm_tmp)
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + (GEMMA)
    )
    msgs = [{"role": "system", "content": "Be brief."}, *conversation(FAMILIES["gemma-sp"])]
    with pytest.raises(ValueError, match="refuses a conversation of roles system/user.*System role not supported"):
        render(tok, msgs)
