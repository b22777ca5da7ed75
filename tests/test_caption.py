"""Captioning: greedy and beam search against naive references (full forward per step, brute force over every
sequence), the key/value cache against full recompute, and `aimv2 caption` end to end on a run trained here."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aimv2.cli import main
from aimv2.data.synthetic.dataset import synthetic_sample
from aimv2.eval.captioning import beam_search, greedy_decode
from aimv2.objectives.aimv2 import create_pretraining_model
from aimv2.weights import RunError, load_pretraining_run

PAD, EOS = 0, 1


def _model(vocab: int = 5, seed: int = 0, sharp: float = 20.0):
    """A random tiny pretraining model; the text head is scaled up so that distributions are peaked (no near-ties)."""
    torch.manual_seed(seed)
    model = create_pretraining_model(
        "aimv2-tiny-patch8-64",
        vocab_size=vocab,
        img_size=16,
        depth=1,
        decoder_embed_dim=32,
        decoder_depth=2,
        decoder_num_heads=2,
        decoder_mlp_hidden_dim=64,
        decoder_max_text_len=8,
    ).eval()
    with torch.no_grad():
        model.decoder.text_head.weight.mul_(sharp)
        model.decoder.text_pos.normal_(std=1.0)  # positions matter: captions are not one token repeated
    return model


def _feats(model, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, model.encoder.cfg.embed_dim, generator=g)  # [B, N, D_enc]


def _log_probs(model, feats, tokens):
    """Full-forward log-probabilities (pad removed) of the next token after each prefix of ``tokens`` [B, t]."""
    _, logits = model.decoder(feats, F.pad(tokens, (0, 1)))  # [B, t + 1, V]
    logits = logits.float().clone()
    logits[..., PAD] = float("-inf")
    return F.log_softmax(logits, dim=-1)


def test_greedy_equals_a_naive_loop_of_full_forwards():
    model, L = _model(), 6
    feats = _feats(model)
    out = greedy_decode(model.decoder, feats, eos_id=EOS, pad_id=PAD, max_len=L)
    for b in range(feats.shape[0]):
        seq, score = [], 0.0
        with torch.no_grad():
            for _ in range(L):
                logp = _log_probs(model, feats[b : b + 1], torch.tensor([seq], dtype=torch.long))[0, -1]
                tok = int(logp.argmax())
                seq.append(tok)
                score += float(logp[tok])
                if tok == EOS:
                    break
        assert out.tokens[b] == seq
        assert out.finished[b] == (seq[-1] == EOS)
        assert out.scores[b] == pytest.approx(score, abs=1e-4)
    assert any(out.finished) or all(len(t) == L for t in out.tokens)


def test_kv_cache_equals_full_recompute():
    model = _model(vocab=11, sharp=1.0)
    feats = _feats(model, batch=2)
    dec = model.decoder
    tokens = torch.randint(2, 11, (2, 7))
    with torch.no_grad():
        _, full = dec(feats, F.pad(tokens, (0, 1)))  # [B, 8, V]: logits after BOS, t_0, ..., t_6
        first, cache = dec.start(feats)
        steps = [first]
        for t in range(7):
            logits, cache = dec.extend(tokens[:, t : t + 1], cache)
            steps.append(logits[:, 0])
        chunk, _ = dec.extend(tokens[:, :4], dec.start(feats)[1])  # several tokens at once: a causal block
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunk, full[:, 1:5], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_text_len"):
        dec.extend(tokens[:, :1], cache)  # 9 positions > max_text_len 8
    for beam in (1, 3):  # the decoders too: same tokens and scores with and without the cache
        args = dict(eos_id=EOS, pad_id=PAD, max_len=6, beam=beam)
        a, b = beam_search(dec, feats, **args), beam_search(dec, feats, use_cache=False, **args)
        assert a.tokens == b.tokens
        assert a.scores == pytest.approx(b.scores, abs=1e-4)


def test_training_forward_is_unchanged_by_the_cache_methods():
    """The cached path is separate methods: the training forward still equals a hand-written causal forward."""
    model = _model(vocab=11, sharp=1.0)
    feats, text = _feats(model, batch=2), torch.randint(2, 11, (2, 5))
    dec = model.decoder
    with torch.no_grad():
        _, logits = dec(feats, text)
        x = torch.cat([dec.image_proj(feats), dec.embed_text(text[:, :-1])], 1)
        for blk in dec.blocks:
            x = blk(x, is_causal=True)
        ref = dec.text_head(dec.norm(x)[:, feats.shape[1] :])
    assert torch.equal(logits, ref)


def test_beam_width_1_equals_greedy():
    for seed in range(3):
        model = _model(seed=seed)
        feats = _feats(model, batch=4, seed=seed)
        g = greedy_decode(model.decoder, feats, eos_id=EOS, pad_id=PAD, max_len=7)
        b = beam_search(model.decoder, feats, eos_id=EOS, pad_id=PAD, max_len=7, beam=1)
        assert b.tokens == g.tokens
        assert b.finished == g.finished
        assert b.scores == pytest.approx(g.scores, abs=1e-5)


def _brute_force(model, feats, max_len: int, vocab: int, length_penalty: float):
    """Every caption up to max_len (ending in <eos>, or cut at max_len), scored by full forwards; the best."""
    words = [t for t in range(vocab) if t not in (PAD, EOS)]
    ended = [[*body, EOS] for n in range(max_len) for body in itertools.product(words, repeat=n)]
    cut = [list(body) for body in itertools.product(words, repeat=max_len)]
    best = None
    for seq in ended + cut:
        with torch.no_grad():
            logp = _log_probs(model, feats, torch.tensor([seq[:-1]], dtype=torch.long))[0]  # [len, V]
        score = float(logp[torch.arange(len(seq)), torch.tensor(seq)].sum())
        ranked = score / len(seq) ** length_penalty
        if best is None or ranked > best[0]:
            best = (ranked, score, seq)
    return best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_the_best_sequence_by_brute_force(length_penalty):
    vocab, max_len = 5, 4  # 3 words: 3 + 9 + 27 + 81 cut sequences and 1 + 3 + 9 + 27 ending in <eos>
    found = 0
    for seed in range(3):
        model = _model(vocab=vocab, seed=seed, sharp=4.0)
        feats = _feats(model, batch=1, seed=seed)
        ranked, score, seq = _brute_force(model, feats, max_len, vocab, length_penalty)
        # a beam wider than the number of candidates of any step is exhaustive
        out = beam_search(
            model.decoder, feats, eos_id=EOS, pad_id=PAD, beam=128, max_len=max_len, length_penalty=length_penalty
        )
        assert out.tokens[0] == seq
        assert out.scores[0] == pytest.approx(score, abs=1e-4)
        # a small beam never beats the optimum, and its score is the true log-probability of what it returns
        small = beam_search(
            model.decoder, feats, eos_id=EOS, pad_id=PAD, beam=2, max_len=max_len, length_penalty=length_penalty
        )
        with torch.no_grad():
            s = small.tokens[0]
            logp = _log_probs(model, feats, torch.tensor([s[:-1]], dtype=torch.long))[0]
        true = float(logp[torch.arange(len(s)), torch.tensor(s)].sum())
        assert small.scores[0] == pytest.approx(true, abs=1e-4)
        assert true / len(s) ** length_penalty <= ranked + 1e-6
        found += seq[-1] == EOS
    assert found  # the optimum ends in <eos> at least once: the test covers finished captions


def test_eos_stops_a_beam():
    """<eos> made far more likely than anything: every decoder returns just [<eos>], and greedy and beam 1 decode
    nothing after it. With <eos> favoured for image 0 only, image 0 stops while image 1 goes on."""
    model = _model()
    dec = model.decoder
    calls = []
    extend = dec.extend
    dec.extend = lambda *a, **k: calls.append(1) or extend(*a, **k)
    boost = {"rows": None}

    def hook(module, inputs, out):  # out [R, V] or [R, L, V]
        add = torch.zeros_like(out)
        rows = slice(None) if boost["rows"] is None else boost["rows"]
        add[rows, ..., EOS] = 50.0
        return out + add

    dec.text_head.register_forward_hook(hook)
    feats = _feats(model, batch=2)
    for beam in (1, 3):
        out = beam_search(dec, feats, eos_id=EOS, pad_id=PAD, beam=beam, max_len=6)
        assert out.tokens == [[EOS], [EOS]] and out.finished == [True, True]
        if beam == 1:
            assert calls == []  # nothing decoded after <eos>
    calls.clear()  # beam 3 decodes on: it needs 3 finished captions before it may stop
    out = greedy_decode(dec, feats, eos_id=EOS, pad_id=PAD, max_len=6)
    assert out.tokens == [[EOS], [EOS]] and calls == []
    boost["rows"] = [0]
    out = greedy_decode(dec, feats, eos_id=EOS, pad_id=PAD, max_len=6)
    assert out.tokens[0] == [EOS] and len(out.tokens[1]) > 1
    assert EOS not in out.tokens[1][:-1]  # no caption runs past its <eos>


# ------------------------------------------------------------------------------------------ the command
BASE = [
    "model.encoder=aimv2-tiny-patch8-64",
    "model.encoder_overrides={depth: 1, img_size: 32}",
    "model.decoder={embed_dim: 32, depth: 1, num_heads: 2, mlp_hidden_dim: 64}",
    "data.context_length=16",
    "data.num_workers=0",
    "train.batch_size=4",
    "train.steps=2",
    "train.progress=false",
    "log.tensorboard=false",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("caption") / "run"
    assert main(["pretrain", "configs/tiny-synthetic.yaml", *BASE, f"out_dir={out}"]) == 0
    return out


def test_caption_command_end_to_end(run_dir, tmp_path, capsys, monkeypatch):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(3):
        synthetic_sample(10_000 + i, seed=7, size=40)[0].save(images / ("sub" if i else "") / f"{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    extra = tmp_path / "extra.jpg"
    Image.new("RGB", (50, 30), "red").save(extra)
    capsys.readouterr()
    args = ["caption", str(run_dir), str(images), str(extra), "--workers", "0", "--max-len", "5"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [
        str(images / "0.png"),
        str(images / "sub/1.png"),
        str(images / "sub/2.png"),
        str(extra),
    ]
    assert "broken.png" in err and "captioned 4 image(s), 1 unreadable skipped" in err
    assert main([*args, "--json", "--beam", "2", "--prefix", "random"]) == 0
    records = [json.loads(line) for line in capsys.readouterr()[0].splitlines()]
    assert len(records) == 4 and all(1 <= r["tokens"] <= 5 and math.isfinite(r["score"]) for r in records)
    assert set(records[0]) == {"path", "caption", "score", "tokens", "finished"}


def test_caption_command_errors_clearly(run_dir, tmp_path, capsys):
    img = tmp_path / "a.png"
    synthetic_sample(0, size=32)[0].save(img)
    # an encoder-only file, a folder that is not a run, a run without checkpoints, a missing image
    cases = [
        (
            [str(run_dir / "encoder.safetensors"), str(img)],
            "Encoder-only files such as encoder.safetensors have no decoder",
        ),
        ([str(tmp_path), str(img)], "no config.yaml"),
        ([str(run_dir), str(tmp_path / "missing.png")], "neither an image file nor a folder"),
        ([str(run_dir), str(img), "--prefix", "half"], "prefix must be"),
        ([str(run_dir), str(img), "--max-len", "99"], "--max-len must be in [1, 16]"),
    ]
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    (empty / "tokenizer.json").write_text((run_dir / "tokenizer.json").read_text())
    cases.append(([str(empty), str(img)], "no checkpoint"))
    for argv, message in cases:
        assert main(["caption", *argv]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(RunError, match="no caption decoder weights"):
        ckpt = run_dir / "checkpoints"
        bad = tmp_path / "enc-only-run"
        (bad / "checkpoints").mkdir(parents=True)
        for name in ("config.yaml", "tokenizer.json"):
            (bad / name).write_text((run_dir / name).read_text())
        state = torch.load(sorted(ckpt.iterdir())[-1], weights_only=True)
        state["model"] = {k: v for k, v in state["model"].items() if k.startswith("encoder.")}
        torch.save(state, bad / "checkpoints" / "step_00000002.pt")
        load_pretraining_run(bad)


@pytest.mark.parametrize("objective", ["cap", "aimv2-separate", "aimv1"])
def test_baseline_runs_caption_with_their_caption_decoder(objective, tmp_path, capsys):
    """A captioning baseline (and AIMv2 with separate decoders) captions with its text decoder, the same as
    greedy decoding by hand; AIMv1 has none and says so."""
    from torchvision.transforms.functional import pil_to_tensor

    from aimv2.eval.captioning import Captioner

    extra = ["model.separate_decoders=true"] if objective == "aimv2-separate" else [f"model.objective={objective}"]
    out = tmp_path / "run"
    assert main(["pretrain", "configs/tiny-synthetic.yaml", *BASE, *extra, f"out_dir={out}"]) == 0
    img = tmp_path / "a.png"
    synthetic_sample(0, size=32)[0].save(img)
    capsys.readouterr()
    if objective == "aimv1":
        assert main(["caption", str(out), str(img)]) == 2
        assert "objective=aimv1: no caption decoder" in capsys.readouterr().err
        return
    assert main(["caption", str(out), str(img), "--max-len", "4"]) == 0
    text = capsys.readouterr().out.split("\t")[1].strip()
    cap = Captioner.from_run(out)
    x = pil_to_tensor(Image.open(img).convert("RGB"))[None]  # uint8 [1, 3, 32, 32]: the command's resize is a no-op
    ids = greedy_decode(cap.model.text_decoder, cap.encode(x), eos_id=cap.tokenizer.eos_id, pad_id=0, max_len=4)
    assert text == cap.tokenizer.decode(ids.tokens[0]).strip()
