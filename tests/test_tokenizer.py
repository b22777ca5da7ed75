"""The caption tokenizer: exact round trips, right padding with eos only when the caption fits, one-file save/load,
and a built-in tokenizer that is the same in every process and gives each synthetic caption word one token."""

import hashlib
import json
import subprocess
import sys
import time

import pytest
import tokenizers
import torch

from aimv2.data.synthetic.captions import caption_tokens
from aimv2.data.synthetic.dataset import synthetic_scene
from aimv2.data.tokenizer import Tokenizer, default_synthetic_tokenizer, train_bpe

TEXTS = [
    "a red circle left of a blue square",
    "Two small GREEN stars, and a crème brûlée: 3 × 4 = 12!",
    "  spaces   inside  ",
    "",
    "emoji 🙂 and 日本語",
]


@pytest.fixture(scope="module")
def tok():
    return default_synthetic_tokenizer()


@pytest.fixture(scope="module")
def bpe():
    corpus = [synthetic_scene(i)[1] for i in range(300)] + TEXTS * 3
    return train_bpe(corpus, vocab_size=600, context_length=32)


def test_special_ids_and_sizes(tok, bpe):
    for t in (tok, bpe):
        assert (t.pad_id, t.eos_id) == (0, 1)
        ids = {t.hf_tokenizer.id_to_token(i) for i in range(3)}
        assert ids == {"<pad>", "<eos>", "<unk>"}
    assert 300 < tok.vocab_size < 1000 and tok.context_length == 77
    assert bpe.vocab_size <= 600 and bpe.context_length == 32


def test_round_trip_lowercases(tok, bpe):
    for t in (tok, bpe):
        ids = t.encode(TEXTS)
        assert ids.shape == (len(TEXTS), t.context_length) and ids.dtype == torch.long
        assert t.decode_batch(ids) == [s.lower() for s in TEXTS]
        assert t.decode(ids[0].tolist()) == TEXTS[0]


def test_eos_then_padding(bpe):
    ids = bpe.encode(["a red circle", ""])
    n = len(bpe.hf_tokenizer.encode("a red circle").ids)
    assert ids[0, n] == bpe.eos_id and (ids[0, :n] > 2).all() and (ids[0, n + 1 :] == bpe.pad_id).all()
    assert ids[1, 0] == bpe.eos_id and (ids[1, 1:] == bpe.pad_id).all()
    # the text "<eos>" is text, not the end of the caption
    weird = bpe.encode("before <eos> after <pad> end")
    assert bpe.decode(weird[0]) == "before <eos> after <pad> end"
    assert (weird[0] == bpe.eos_id).sum() == 1


def test_truncation_drops_eos_only_when_the_caption_does_not_fit(bpe):
    length = bpe.context_length
    word = " red"
    assert len(bpe.hf_tokenizer.encode(word).ids) == 1
    fits = "red" + word * (length - 2)  # length - 1 tokens: eos takes the last slot
    full = "red" + word * (length - 1)  # length tokens: no room for eos
    long = "red" + word * (length + 10)
    a, b, c = bpe.encode([fits, full, long])
    assert a[-1] == bpe.eos_id and (a[:-1] != bpe.eos_id).all()
    assert (b != bpe.eos_id).all() and (b != bpe.pad_id).all()
    assert torch.equal(b, c)  # cut to the first `length` tokens
    assert bpe.decode(c) == full


def test_save_load_is_one_file_and_identical(tok, bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    back = Tokenizer.from_file(path)
    assert back.to_str() == tok.to_str()
    assert (back.context_length, back.pad_id, back.eos_id, back.vocab_size) == (
        tok.context_length,
        tok.pad_id,
        tok.eos_id,
        tok.vocab_size,
    )
    captions = [synthetic_scene(i)[1] for i in range(20)] + TEXTS
    assert torch.equal(back.encode(captions), tok.encode(captions))
    assert list(tmp_path.iterdir()) == [path]
    # plain `tokenizers` reading our file pads and appends eos the same way for captions that fit
    plain = tokenizers.Tokenizer.from_file(str(path))
    assert plain.encode(captions[0]).ids == tok.encode(captions[0])[0].tolist()
    # the context length travels in the file
    bpe.save(tmp_path / "bpe.json")
    assert Tokenizer.from_file(tmp_path / "bpe.json").context_length == bpe.context_length == 32
    # settings can be overridden on load
    short = Tokenizer.from_file(path, context_length=8)
    assert short.encode(captions).shape == (len(captions), 8)


def test_foreign_tokenizer_json_needs_its_eos_named(tmp_path):
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[PAD]": 0, "hi": 1, "[SEP]": 2}, unk_token="[PAD]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    text = hf.to_str()
    with pytest.raises(ValueError, match="pad"):
        Tokenizer.from_str(text)
    t = Tokenizer.from_str(text, pad_token="[PAD]", eos_token="[SEP]", context_length=4)
    assert t.encode("hi hi").tolist() == [[1, 1, 2, 0]]
    assert json.loads(t.to_str())["padding"]["strategy"] == {"Fixed": 4}


def test_default_tokenizer_one_token_per_caption_word(tok):
    for i in range(200):
        _, text = synthetic_scene(i, seed=9)
        ids = tok.encode(text)[0]
        n = int((ids != tok.pad_id).sum())
        assert n == len(caption_tokens(text)) + 1, text  # + eos
        assert tok.decode(ids) == text


_FINGERPRINT = (
    "import hashlib; from aimv2.data.tokenizer import default_synthetic_tokenizer as d; "
    "print(hashlib.sha256(d().to_str().encode()).hexdigest())"
)


def test_default_tokenizer_is_deterministic_and_fast(tok):
    t0 = time.perf_counter()
    again = default_synthetic_tokenizer()
    assert time.perf_counter() - t0 < 2.0  # about 0.2 s on one idle core; slack for busy CI machines
    assert again.to_str() == tok.to_str()
    # another process (different hash seeds inside `tokenizers` and Python) builds the very same file
    out = subprocess.run([sys.executable, "-c", _FINGERPRINT], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == hashlib.sha256(tok.to_str().encode()).hexdigest()


def test_train_bpe_is_deterministic():
    corpus = [synthetic_scene(i, seed=1)[1] for i in range(200)] + TEXTS
    a = train_bpe(corpus, vocab_size=400)
    b = train_bpe(iter(corpus), vocab_size=400)
    assert a.to_str() == b.to_str()
    cased = train_bpe(corpus, vocab_size=400, lowercase=False)
    assert cased.decode(cased.encode("MiXeD")[0]) == "MiXeD"


def test_encode_rejects_non_strings(tok):
    with pytest.raises(TypeError):
        tok.encode(["ok", None])


def _clip_like_json() -> str:
    """A tokenizer.json shaped like CLIP's: start and end tokens in the post-processor template, no pad token."""
    from tokenizers import models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(["!", "a", "photo", "of", "cat", "dog", "<|startoftext|>", "<|endoftext|>"])}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="!"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 6), ("<|endoftext|>", 7)],
    )
    return tk.to_str()


def test_a_start_token_in_the_files_template_is_kept(tmp_path):
    text = _clip_like_json()
    with pytest.raises(ValueError, match="pad"):  # CLIP's file names no pad token: say which to use
        Tokenizer.from_str(text)
    tok = Tokenizer.from_str(text, pad_token="<|endoftext|>", context_length=8)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (6, 7, 7)
    assert tok.encode("a photo of a dog")[0].tolist() == [6, 1, 2, 3, 1, 5, 7, 7]
    # the same ids as plain tokenizers with its own template, padded
    plain = tokenizers.Tokenizer.from_str(text).encode("a photo of a dog").ids
    assert tok.encode("a photo of a dog")[0].tolist()[: len(plain)] == plain
    assert tok.encode("a photo of a cat dog cat")[0].tolist() == [6, 1, 2, 3, 1, 4, 5, 4]  # cut: no eos
    assert tok.decode(tok.encode("a photo of a dog")[0]) == "a photo of a dog"
    tok.save(tmp_path / "t.json")  # the start token survives a save
    again = Tokenizer.from_file(tmp_path / "t.json")
    assert again.bos_id == 6 and torch.equal(again.encode("a cat"), tok.encode("a cat"))
    assert Tokenizer.from_str(text, pad_token="!", bos_token="<|endoftext|>").bos_id == 7  # arguments override
    assert default_synthetic_tokenizer().bos_id is None  # ours: the decoder has its own start


def test_zeroshot_reads_a_clip_like_tokenizer_without_a_pad_token(tmp_path):
    from types import SimpleNamespace

    from aimv2.eval.zeroshot import lit_tokenizer

    (tmp_path / "tokenizer.json").write_text(_clip_like_json())
    model = SimpleNamespace(cfg=SimpleNamespace(text=SimpleNamespace(context_length=6, eos_id=7)))
    tok = lit_tokenizer(model, tmp_path, tmp_path / "tokenizer.json")
    assert tok.encode("a cat")[0].tolist() == [6, 1, 4, 7, 7, 7]
    model.cfg.text.eos_id = 5  # a model pooling at another id is refused (`aimv2 zeroshot`: one line, status 2)
    with pytest.raises(ValueError, match="eos id 5"):
        lit_tokenizer(model, tmp_path, tmp_path / "tokenizer.json")


def test_a_config_names_the_pad_token_of_a_file_without_one(tmp_path):
    from pathlib import Path

    from aimv2.config import ConfigError, load_config
    from aimv2.train.sources import build_source

    (tmp_path / "clip.json").write_text(_clip_like_json())
    root = Path(__file__).resolve().parents[1]
    base = ["data.context_length=8", f"data.tokenizer={tmp_path / 'clip.json'}"]
    with pytest.raises(ConfigError, match="data.pad_token"):
        build_source(load_config(root / "configs/tiny-synthetic.yaml", base), None)
    cfg = load_config(root / "configs/tiny-synthetic.yaml", [*base, "data.pad_token=<|endoftext|>"])
    tok = build_source(cfg, None).tokenizer
    assert tok.encode("a dog")[0].tolist() == [6, 1, 5, 7, 7, 7, 7, 7]
