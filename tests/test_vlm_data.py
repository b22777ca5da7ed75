"""VLM data that is partly bad trains on the rest and says so: unreadable or missing images and conversations with
no answer are replaced by the next usable sample and counted, turns past vlm.max_length are dropped whole and
counted, and the counts reach metrics.jsonl."""

import json
from pathlib import Path

import pytest
import torch
from conftest import QUIET
from PIL import Image

from aimv2.config import load_config
from aimv2.config.vlm import VLMConfig
from aimv2.data.chat import IGNORE
from aimv2.data.faults import FAULT_KINDS
from aimv2.data.sources.llava import LlavaConversations
from aimv2.train.vlm_task import ConversationSteps, train_vlm
from aimv2.weights import create_model, save_encoder
from aimv2.weights.lm import build_tiny_lm, load_causal_lm

ROOT = Path(__file__).resolve().parents[1]
QA = [{"from": "human", "value": "<image>\nWhat colour is the star?"}, {"from": "gpt", "value": "red"}]
LONG = QA + [{"from": "human", "value": "How many shapes are there? " * 6}, {"from": "gpt", "value": "3"}] * 3


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("vlm-data")
    torch.manual_seed(1)
    save_encoder(create_model("aimv2-tiny-patch8-64", depth=1, img_size=16), d / "encoder.safetensors")
    build_tiny_lm(d / "lm", width=32, depth=1, heads=2)
    img = d / "images"
    img.mkdir()
    Image.new("RGB", (20, 20), (200, 0, 0)).save(img / "good.jpg")
    (img / "cut.jpg").write_bytes((img / "good.jpg").read_bytes()[:200])  # a truncated JPEG
    (img / "text.jpg").write_text("not an image")
    records = [
        {"image": "good.jpg", "conversations": QA},  # 0
        {"image": "cut.jpg", "conversations": QA},  # 1 bad_image
        {"image": "text.jpg", "conversations": QA},  # 2 bad_image
        {"image": "gone.jpg", "conversations": QA},  # 3 no_image
        {"conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "red"}]},  # 4 text only
        {"image": "good.jpg", "conversations": QA[:1]},  # 5 no_answer (no gpt turn)
        {"image": "good.jpg", "conversations": LONG},  # 6 turns dropped at max_length 40
        {"image": "good.jpg", "conversations": QA},  # 7
    ]
    (d / "data.json").write_text(json.dumps(records))
    return d


def test_bad_samples_are_replaced_by_the_next_usable_one_and_counted(parts, caplog):
    _, tok = load_causal_lm(parts / "lm")
    ds = LlavaConversations(parts / "data.json", parts / "images", (16, 16))
    steps = ConversationSteps(ds, tok, global_batch=8, rank=0, world_size=1, start_step=0, steps=1, seed=0,
                              max_length=40)  # fmt: skip
    steps.dataset_index = lambda i: i  # in file order, to count by hand
    with caplog.at_level("WARNING"):
        got = [steps.sample(i) for i in range(8)]
    first = got[0][1]
    # 1, 2, 3 fall through to the text-only record 4; 5 to 6 (cut to its first turn); 6 and 7 are themselves
    assert [g[1] for g in got[1:4]] == [got[4][1]] * 3 and got[5][1] == got[6][1] and got[7][1] == first
    assert tok.convert_tokens_to_ids("<image>") not in got[4][1] and (got[4][0] == 0).all()
    assert [tok.convert_ids_to_tokens(t) for t, lab in zip(got[6][1], got[6][2], strict=True) if lab != IGNORE] == [
        "red", "</s>"]  # fmt: skip
    counts = dict(zip(FAULT_KINDS, steps.skipped().tolist(), strict=True))
    # record 1: bad, 2: bad, 3: missing, seen once per sample that walks past them (i = 1, 2, 3)
    assert counts["bad_image"] == 2 + 1 and counts["no_image"] == 3
    assert counts["no_answer"] == 1 and counts["dropped_turns"] == 3 * 2  # samples 5 and 6 each drop 3 turns
    text = caplog.text
    assert "cut.jpg" in text and "gone.jpg" in text and "vlm.max_length=40" in text  # the first of each kind
    assert "record 5 of" in text and "data.json" in text


def test_a_run_on_partly_bad_llava_data_logs_its_skips(parts, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs/vlm-tiny-stage2.yaml", [
        f"vlm.encoder={parts / 'encoder.safetensors'}", "vlm.encoder_overrides={depth: 1, img_size: 16}",
        f"vlm.lm={parts / 'lm'}", f"out_dir={out}", "vlm.max_length=40", "train.batch_size=8", "train.steps=1",
        "train.log_every=1", "optim.warmup_steps=1", "vlm.data=llava", f"vlm.json={parts / 'data.json'}",
        f"vlm.images={parts / 'images'}", "data.max_fault_rate=0.9", *QUIET], VLMConfig)  # fmt: skip
    train_vlm(cfg)
    (m,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    for kind in ("bad_image", "no_image", "no_answer", "dropped_turns"):
        assert m[f"data_skipped/{kind}"] >= 1, m


def test_images_missing_after_record_100_are_skipped_and_too_many_stop_the_run(parts, tmp_path):
    """The reader checks the first records' images at start; one missing later is a counted skip, not a stop,
    until more than max_fault_rate of the samples read are bad (then one error naming the kind and the file)."""
    from aimv2.data.faults import FaultRateError

    _, tok = load_causal_lm(parts / "lm")
    records = [{"image": "good.jpg", "conversations": QA}] * 100 + [{"image": "gone.jpg", "conversations": QA}] * 20
    (tmp_path / "d.json").write_text(json.dumps(records))
    ds = LlavaConversations(tmp_path / "d.json", parts / "images", (16, 16), max_fault_rate=0.1)
    steps = ConversationSteps(ds, tok, global_batch=1, rank=0, world_size=1, start_step=0, steps=1, seed=0,
                              max_length=64)  # fmt: skip
    steps.dataset_index = lambda i: i
    image, ids, _ = steps.sample(110)  # 110..119 missing: wraps around to record 0
    assert ids == steps.sample(0)[1] and dict(zip(FAULT_KINDS, steps.skipped().tolist(), strict=True))["no_image"] == 10
    bad = [{"image": "good.jpg", "conversations": QA}] + [{"image": "text.jpg", "conversations": QA}] * 150
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    ds = LlavaConversations(tmp_path / "bad.json", parts / "images", (16, 16), max_fault_rate=0.5)
    steps = ConversationSteps(ds, tok, global_batch=1, rank=0, world_size=1, start_step=0, steps=1, seed=0,
                              max_length=64)  # fmt: skip
    steps.dataset_index = lambda i: i
    with pytest.raises(FaultRateError, match=r"bad_image x\d+ \(first: .*text.jpg"):
        steps.sample(1)
