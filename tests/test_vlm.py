"""The VLM objective against naive references: where the image tokens land, which positions carry loss, the loss
itself; the chat-template labelling, LLaVA records, the built-in questions and VQAv2's answer scoring."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from aimv2.data.chat import IGNORE, encode_conversation, pad_batch, render
from aimv2.data.sources.llava import LlavaConversations, to_messages
from aimv2.data.synthetic.captions import caption
from aimv2.data.synthetic.questions import (
    QUESTION_TYPES,
    SyntheticConversations,
    heldout_questions,
    question_scene,
    scene_questions,
)
from aimv2.eval.vqa import cider, normalize_answer, vqa_accuracy
from aimv2.objectives.vlm import VisionLanguageModel, splice
from aimv2.weights import create_model
from aimv2.weights.lm import IMAGE_TOKEN, build_tiny_lm, load_causal_lm


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return build_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny", width=32, depth=1, heads=2)


def _model(lm_dir, **kw):
    torch.manual_seed(0)
    lm, tok = load_causal_lm(lm_dir)
    enc = create_model("aimv2-tiny-patch8-64", depth=1, img_size=16)
    return VisionLanguageModel(enc, lm, tok.convert_tokens_to_ids(IMAGE_TOKEN), **kw), tok


def _batch(tok, n=3, kind="qa", size=(16, 16)):
    """n conversations of different lengths (placeholders after prompts of different lengths: a system turn)."""
    ds = SyntheticConversations(kind, seed=0, size=size, turns=2)
    rows, labels, images = [], [], []
    for i in range(n):
        image, messages = ds[i]
        if i % 2:  # a longer prefix before the placeholder
            messages[0]["content"] = "Look closely. " * i + messages[0]["content"]
        ids, lab = encode_conversation(tok, messages, 256)
        rows.append(ids)
        labels.append(lab)
        images.append(image)
    ids, labels, mask = pad_batch(rows, tok.pad_token_id, labels=labels)
    return torch.stack(images).float() / 255, ids, labels, mask, rows


def _naive(model, images, rows):
    """Per sample, unpadded: text embeddings before <image>, the projected image tokens, the text after."""
    out = []
    for b, row in enumerate(rows):
        ids = torch.tensor(row)
        p = row.index(model.image_token_id)
        emb = model.lm.get_input_embeddings()(ids.masked_fill(ids == model.image_token_id, 0))
        img = model.projector(model.encoder(images[b : b + 1]))[0]
        out.append(torch.cat([emb[:p], img, emb[p + 1 :]]))
    return out


def test_image_tokens_land_where_the_placeholder_was(lm_dir):
    model, tok = _model(lm_dir)
    images, ids, labels, mask, rows = _batch(tok, n=4)
    assert len({r.index(model.image_token_id) for r in rows}) > 1  # different prompt lengths
    with torch.no_grad():
        embeds, new_mask, new_labels = model.embed(images, ids, mask, labels)
        naive = _naive(model, images, rows)
    K = model.tokens_per_image
    for b, ref in enumerate(naive):
        L = len(ref)
        torch.testing.assert_close(embeds[b, :L], ref, rtol=1e-5, atol=1e-6)  # batched vs alone: roundoff
        assert new_mask[b, :L].all() and not new_mask[b, L:].any()
        p = rows[b].index(model.image_token_id)
        assert (new_labels[b, p : p + K] == IGNORE).all()
        assert new_labels[b, :p].tolist() == labels[b, :p].tolist()
        assert new_labels[b, p + K : L].tolist() == labels[b, p + 1 : len(rows[b])].tolist()


def test_splice_keeps_left_padding_in_front():
    embeds = torch.arange(2 * 5, dtype=torch.float).reshape(2, 5, 1)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    image = torch.full((2, 3, 1), -1.0)
    out, m, _ = splice(embeds, image, torch.tensor([3, 1]), mask)
    assert out[0, :, 0].tolist() == [0, 1, 2, -1, -1, -1, 4]
    assert out[1, :, 0].tolist() == [5, -1, -1, -1, 7, 8, 9]
    assert m[0].tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_loss_is_the_naive_answer_token_cross_entropy(lm_dir):
    model, tok = _model(lm_dir, stage=2)
    images, ids, labels, mask, rows = _batch(tok, n=3)
    out = model(images, ids, labels, mask)
    total, n = 0.0, 0
    with torch.no_grad():
        for b, emb in enumerate(_naive(model, images, rows)):
            logp = F.log_softmax(model.lm(inputs_embeds=emb[None]).logits[0].double(), -1)  # alone, no padding
            p = rows[b].index(model.image_token_id)
            K = model.tokens_per_image
            for t, (tokid, lab) in enumerate(zip(rows[b], labels[b].tolist(), strict=False)):
                if lab == IGNORE or t == 0:
                    continue
                pos = t if t < p else t + K - 1  # where text token t sits after the splice
                total -= logp[pos - 1, tokid].item()
                n += 1
    assert n == int(model.loss_counts(images, ids, labels, mask)["text_loss"]) == int(out.terms.counts["text_loss"])
    assert out.loss.item() == pytest.approx(total / n, rel=1e-5)


def test_prompt_and_image_positions_get_no_loss_gradient(lm_dir):
    model, tok = _model(lm_dir, stage=2)
    images, ids, labels, mask, _ = _batch(tok, n=2)
    out = model(images, ids, labels, mask)
    out.logits.retain_grad()
    out.loss.backward()
    with torch.no_grad():
        _, _, spliced = model.embed(images, ids, mask, labels)
    grad = out.logits.grad.abs().sum(-1)  # [B, L]
    predicts_answer = torch.zeros_like(grad, dtype=torch.bool)
    predicts_answer[:, :-1] = spliced[:, 1:] != IGNORE
    assert (grad[~predicts_answer] == 0).all()
    assert (grad[predicts_answer] > 0).all()


def test_labels_cover_the_answers_and_the_turn_end_only(lm_dir):
    _, tok = _model(lm_dir)
    messages = [
        {"role": "user", "content": f"{IMAGE_TOKEN}\nWhat colour is the star?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "How many shapes are there?"},
        {"role": "assistant", "content": "3"},
    ]
    ids, labels = encode_conversation(tok, messages, 512)
    answered = tok.convert_ids_to_tokens([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert answered == ["red", "</s>", "3", "</s>"]
    tok.chat_template = None  # the plain template
    assert render(tok, messages).startswith("<s>USER: <image>\nWhat colour is the star?\nASSISTANT: red</s>\n")
    ids, labels = encode_conversation(tok, messages, 512)
    answered = tok.convert_ids_to_tokens([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert answered == ["red", "</s>", "3", "</s>"]


def test_the_tiny_tokenizer_reads_every_built_in_text_and_answers_in_one_word(lm_dir):
    """Word-level over the scenes' closed vocabulary: no caption, question or answer of either stream holds a word
    outside it (an <unk> would teach the LM nothing), every answer is one token, and decoding gives the text back."""
    _, tok = _model(lm_dir)
    for split in ("train", "heldout"):
        for i in range(150):
            spec, rng = question_scene(i, 0, split)
            for qas in scene_questions(spec).values():
                for qa in qas:
                    assert tok.unk_token_id not in tok(qa.question, add_special_tokens=False)["input_ids"], qa
                    assert len(tok(qa.answer, add_special_tokens=False)["input_ids"]) == 1, qa
            cap = caption(spec, rng)
            ids = tok(cap, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, cap
            assert tok.decode(ids).replace(" :", ":") == cap.lower()  # the decoder's cleanup joins , . ? only
    assert tok.convert_ids_to_tokens(tok("Is it purple?", add_special_tokens=False)["input_ids"]) == [
        "is", "<unk>", "purple", "?"]  # fmt: skip


def test_llava_records_from_a_json_file_and_an_image_folder(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("L", (10, 10), 7).save(tmp_path / "b.png")
    records = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                             {"from": "gpt", "value": "red"}]},
        {"image": "b.png", "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "x"},
                                             {"from": "human", "value": "More?"}, {"from": "gpt", "value": "no"}]},
    ]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(records))
    ds = LlavaConversations(tmp_path / "data.json", tmp_path, (16, 24))
    image, messages = ds[0]
    assert image.shape == (3, 16, 24) and image.dtype == torch.uint8 and image[0].min() == 255
    assert [m["role"] for m in ds[1][1]] == ["user", "assistant", "user", "assistant"]
    assert ds[1][1][0]["content"] == "<image>\nDescribe."  # placeholder put in front, as LLaVA's loader does
    with pytest.raises(ValueError, match="2 <image>"):
        to_messages({"conversations": [{"from": "human", "value": "<image><image>"}]})


def test_scene_questions_are_unambiguous_and_heldout_scenes_are_new():
    for i in range(30):
        spec, _ = question_scene(i, 0, "train")
        qs = scene_questions(spec)
        assert qs["count"][0].answer == str(len(spec.objects))
        for qa in qs["colour"] + qs["size"]:
            shape = qa.question.split("the ")[-1].rstrip("?")
            (obj,) = [o for o in spec.objects if o.shape == shape]
            assert qa.answer in (obj.colour, obj.size)
        for qa in qs["position"]:
            a, b = (
                next(o for o in spec.objects if o.shape == w) for w in qa.question[7:-1].split(" left or right of the ")
            )
            assert (qa.answer == "left") == (a.x < b.x)
    train = {repr(question_scene(i, 0, "train")[0]) for i in range(200)}
    assert not train & {repr(question_scene(i, 0, "heldout")[0]) for i in range(200)}
    kinds = {qa.kind for _, qa in heldout_questions(50)}
    assert kinds == set(QUESTION_TYPES)


def test_vqa_normalization_and_accuracy_follow_vqav2():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("The red car.") == "red car"
    assert normalize_answer("  a Dog! ") == "dog"
    assert normalize_answer("3.5") == "3.5" and normalize_answer("1,000") == "1000"
    assert normalize_answer("dont") == "don't"
    assert vqa_accuracy("three", ["3"]) == 1.0 and vqa_accuracy("blue", ["red"]) == 0.0
    refs = ["yes"] * 2 + ["no"] * 8  # 2 of 10 humans: leave-one-out min(1, k/3) averaged = 0.6
    assert vqa_accuracy("Yes", refs) == pytest.approx(0.6)
    assert vqa_accuracy("no", refs) == 1.0


def test_cider_ranks_the_right_caption_first():
    refs = [["a red circle on a grey background", "a red circle"], ["two blue squares", "blue squares on white"]]
    good = cider(["a red circle on grey", "two blue squares"], refs)
    bad = cider(["two blue squares", "a red circle on grey"], refs)
    assert good > 1.0 > bad


def test_two_placeholders_are_an_error_that_says_why(lm_dir):
    model, tok = _model(lm_dir)
    images, ids, labels, mask, _ = _batch(tok, n=2)
    ids[0][0] = model.image_token_id
    with pytest.raises(ValueError, match=r"at most one <image> placeholder .* got \[2, 1\]"):
        model(images, ids, labels, mask)


def test_a_text_only_sample_trains_without_image_tokens(lm_dir):
    """LLaVA's mixes hold text-only conversations: such a sample, batched with one that has an image, gets the
    loss and answer count of the LM alone on its text (its image positions are masked out)."""
    model, tok = _model(lm_dir, stage=2)
    model.eval()
    images, _, lab0, _, rows = _batch(tok, n=1)
    text = [{"role": "user", "content": "How many shapes are there?"}, {"role": "assistant", "content": "3"}]
    ids_t, lab_t = encode_conversation(tok, text, 256)
    assert model.image_token_id not in ids_t
    ids, labels, mask = pad_batch([rows[0], ids_t], tok.pad_token_id, labels=[lab0[0].tolist(), lab_t])
    both = model(torch.cat([images, images]), ids, labels, mask)
    img_only = model(images, ids[:1, : len(rows[0])], labels[:1, : len(rows[0])], mask[:1, : len(rows[0])])
    with torch.no_grad():
        logits = model.lm(input_ids=torch.tensor([ids_t])).logits[0]
    target = torch.tensor(lab_t[1:])
    ce = F.cross_entropy(logits[:-1], target, ignore_index=IGNORE, reduction="sum")
    n_text = int((target != IGNORE).sum())
    n_img = int(img_only.terms.counts["text_loss"])
    assert int(both.terms.counts["text_loss"]) == n_img + n_text
    expected = (img_only.terms.sums["text_loss"] + ce) / (n_img + n_text)
    assert both.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_vlm_scene_writes_the_image_the_evaluation_scores(tmp_path, capsys):
    """`aimv2 vlm scene` is how a user gets a held-out scene to `ask` about: its PNG must hold the pixels the
    evaluation feeds the model for that scene, and it must list that scene's questions with their answers."""
    from aimv2.cli import main
    from aimv2.eval.vqa import synthetic_vqa_samples

    assert main(["vlm", "scene", "2", str(tmp_path / "s.png"), "--size", "32"]) in (0, None)
    printed = capsys.readouterr().out
    written = torch.from_numpy(np.asarray(Image.open(tmp_path / "s.png").convert("RGB")).copy()).permute(2, 0, 1)
    evaluated = synthetic_vqa_samples(3, (32, 32))  # in the order of heldout_questions
    asked = [(qa, sample) for (i, qa), sample in zip(heldout_questions(3), evaluated, strict=True) if i == 2]
    assert asked
    for qa, (_, image, question, refs) in asked:
        assert torch.equal(image, written) and question == qa.question
        assert any(line.split() == [qa.kind, *question.split(), *refs] for line in printed.splitlines())
