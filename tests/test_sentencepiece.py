"""A SentencePiece unigram model read as our Tokenizer encodes exactly as sentencepiece itself does."""

import pytest

from aimv2.data.synthetic.dataset import synthetic_scene
from aimv2.data.tokenizer import Tokenizer

spm = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    captions = [synthetic_scene(i, 0)[1] for i in range(400)]
    (d / "captions.txt").write_text("\n".join(captions))
    spm.SentencePieceTrainer.train(
        input=str(d / "captions.txt"), model_prefix=str(d / "sp"), vocab_size=80, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )  # fmt: skip
    return d / "sp.model"


def test_same_ids_as_sentencepiece(spm_model):
    ref = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = Tokenizer.from_sentencepiece(spm_model, context_length=64)
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    captions = [synthetic_scene(i, 1)[1] for i in range(1000, 1050)] + ["a  red   circle", "Two Blue Squares"]
    ids = tok.encode(captions)
    for row, caption in zip(ids.tolist(), captions, strict=True):
        expected = ref.encode(" ".join(caption.lower().split()))
        n = min(len(expected), 64)
        assert row[:n] == expected[:n], caption
        if len(expected) < 64:
            assert row[len(expected)] == tok.eos_id
    assert tok.decode(ids[0]) == captions[0]


def test_not_a_model_file_is_refused(tmp_path):
    bad = tmp_path / "x.model"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(Exception):  # noqa: B017 - protobuf's DecodeError
        Tokenizer.from_sentencepiece(bad)


def test_pretrain_with_a_sentencepiece_tokenizer(spm_model, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "aimv2", "pretrain", str(root / "configs/tiny-synthetic.yaml"),
           "model.encoder_overrides={depth: 1, img_size: 32}", "model.decoder={embed_dim: 64, depth: 1, num_heads: 2}",
           f"data.tokenizer={spm_model}", "data.context_length=48", "data.num_workers=0", "train.batch_size=4",
           "train.steps=2", "train.checkpoint_every=2", "train.progress=false", "log.tensorboard=false",
           f"out_dir={out}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(root / "src")))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    saved = Tokenizer.from_file(out / "tokenizer.json")
    assert saved.vocab_size == 80 and (saved.pad_id, saved.eos_id) == (0, 1)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1] == 2
