"""Distillation (``model.objective=distill``): the loss against a naive recomputation with torch's functional ops,
teachers of another width and grid, gradients that never reach the teacher (nor its weights the state dict, the
optimizer or a checkpoint), teachers read from a run folder and from a .safetensors file, one-line config errors,
the AIMv2 part's leak checks, resume bit for bit, the FLOP count, and a student that learns."""

import subprocess
import sys

import pytest
import test_pretrain_objective as objective_tests
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_RUN, kill9_after_checkpoint, read_metrics, subprocess_env, training_flops
from safetensors.torch import load_file

import aimv2
from aimv2.cli import main
from aimv2.models.decoder import MultimodalDecoder, default_decoder_config
from aimv2.objectives import Distiller
from aimv2.train.metrics import encoder_forward_flops, flops_per_sample

CONFIG = str(ROOT / "configs" / "tiny-synthetic.yaml")
TINY = "aimv2-tiny-patch8-64"


def distiller(img_size=32, teacher=TINY, teacher_overrides=None, aimv2_weight=0.0, **kw) -> Distiller:
    torch.manual_seed(0)
    student = aimv2.create_model(TINY, depth=2, img_size=img_size)
    t = aimv2.create_model(teacher, **{"depth": 1, "img_size": img_size, **(teacher_overrides or {})})
    decoder = None
    if aimv2_weight > 0:
        dcfg = default_decoder_config("tiny", vocab_size=objective_tests.V, depth=2)
        decoder = MultimodalDecoder(dcfg, student.cfg.embed_dim, student.cfg.patch_dim)
    return Distiller(student, t, decoder=decoder, aimv2=aimv2_weight, **kw)


def naive_loss(model: Distiller, images, teacher_images, teacher_grid, cosine, smooth_l1, beta):
    """The documented loss by hand: the teacher on its own input, its [gh, gw] grid resized to the student's."""
    with torch.no_grad():
        t = model.teacher(teacher_images)  # [B, Nt, Dt]
    B, _, D = t.shape
    gh, gw = images.shape[-2] // 8, images.shape[-1] // 8
    grid = t.reshape(B, *teacher_grid, D).permute(0, 3, 1, 2)  # [B, Dt, th, tw]
    if tuple(teacher_grid) != (gh, gw):
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False, antialias=True)
    t = grid.permute(0, 2, 3, 1).reshape(B, gh * gw, D)
    s = model.projection(model.encoder(images))
    cos = (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return cosine * cos + smooth_l1 * F.smooth_l1_loss(s, t, beta=beta), cos


def test_loss_equals_a_naive_recomputation_with_a_wider_teacher():
    model = distiller(teacher="aimv2-small-patch8-64", cosine=0.7, smooth_l1=0.3, smooth_l1_beta=0.5)
    assert model.projection.weight.shape == (384, 192)  # student 192 -> teacher 384
    images, text = objective_tests._batch()
    out = model(images, text)
    want, cos = naive_loss(model, images, images, (4, 4), 0.7, 0.3, 0.5)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.terms.means()["distill_cosine"], cos, rtol=1e-5, atol=1e-6)
    assert out.terms.counts["distill_cosine"] == 2 * 16 and out.terms.counts["image_loss"] == 0
    assert out.image_loss == 0 and out.text_loss == 0 and out.image_pred is None


@pytest.mark.parametrize("teacher_size", [(64, 64), (16, 32)], ids=["finer-grid", "coarser-wider-grid"])
def test_teacher_of_another_grid_sees_its_own_size_and_its_grid_is_resized(teacher_size):
    """The student's 4 x 6 grid (32 x 48 px) against a teacher of 8 x 8 (64 px: features shrink) or of 2 x 4
    (16 x 32 px: features grow); the non-square grid catches a transposed reshape."""
    model = distiller(img_size=(32, 48), teacher_overrides={"img_size": teacher_size})
    images, text = objective_tests._batch(H=32, W=48)
    resized = F.interpolate(images, size=teacher_size, mode="bilinear", align_corners=False, antialias=True)
    want, _ = naive_loss(model, images, resized, (teacher_size[0] // 8, teacher_size[1] // 8), 1.0, 1.0, 1.0)
    torch.testing.assert_close(model(images, text).loss, want, rtol=1e-5, atol=1e-6)


def test_gradients_reach_student_and_projection_never_the_teacher():
    model = distiller(teacher="aimv2-small-patch8-64").train()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    assert not any(k.startswith("teacher") for k in model.state_dict())
    assert {id(p) for p in model.parameters()}.isdisjoint(id(p) for p in model.teacher.parameters())
    assert "teacher" not in dict(model.named_children())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    images, text = objective_tests._batch()
    for _ in range(3):
        opt.zero_grad()
        model(images, text).loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert not model.teacher.training  # the trainer's model.train() never reaches it
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_flops_per_sample_counts_the_teacher_forward_once():
    """torch's FlopCounterMode over a training step (student forward + backward, teacher forward only, at its own
    finer grid) against the formula."""
    model = distiller(teacher="aimv2-small-patch8-64", teacher_overrides={"img_size": 64, "depth": 2})
    images, text = objective_tests._batch()
    counted = training_flops(model, images, text) / 2
    assert counted == pytest.approx(flops_per_sample(model, 16, 7), rel=0.01)
    assert encoder_forward_flops(model.teacher.cfg, 64) > 0.2 * counted  # the teacher's share is no rounding error


def distill_model(img_size=32, **kw):
    """objective_tests' ``_model`` with the AIMv2 part on: the leak checks run on distillation's prefix forward."""
    return distiller(img_size=img_size, aimv2_weight=0.5).eval()


@pytest.mark.parametrize("check", objective_tests.LEAK_CHECKS, ids=objective_tests.LEAK_CHECK_IDS)
def test_no_leakage_in_the_aimv2_part(check, monkeypatch):
    monkeypatch.setattr(objective_tests, "_model", distill_model)
    check()


def test_aimv2_part_adds_its_weighted_loss():
    model = distill_model()
    images, text = objective_tests._batch()
    prefix = torch.tensor([3, 9])
    out = model(images, text, prefix_len=prefix)
    assert torch.equal(out.prefix_len, prefix) and out.image_pred.shape == (2, 15, 192)
    distill = out.terms.means()["distill_cosine"] + out.terms.means()["distill_smooth_l1"]
    torch.testing.assert_close(out.loss, distill + 0.5 * (out.text_loss + 0.4 * out.image_loss))
    assert out.terms.counts["image_loss"] == (16 - 3) + (16 - 9)
    assert model.loss_counts(images, text, prefix) == {k: out.terms.counts[k] for k in out.terms.counts}


RUN = [*TINY_RUN, "model.objective=distill", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A tiny pretraining run (2 steps) to distill from: its folder and its encoder.safetensors."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["pretrain", CONFIG, *TINY_RUN, "train.steps=2", f"out_dir={out}"]) == 0
    return out


def test_teacher_from_a_run_folder_or_its_safetensors_trains_alike(tmp_path, teacher_run):
    rows = {}
    for kind, teacher in (("folder", teacher_run), ("file", teacher_run / "encoder.safetensors")):
        out = tmp_path / kind
        args = [*RUN, "train.steps=2", f"model.distill.teacher={teacher}", f"out_dir={out}"]
        assert main(["pretrain", CONFIG, *args]) == 0
        rows[kind] = read_metrics(out)
        ckpt = torch.load(out / "checkpoints" / "step_00000002.pt", weights_only=True)
        assert not any("teacher" in k for k in ckpt["model"]), "the teacher must not be checkpointed"
        exported = load_file(out / "encoder.safetensors")
        assert not any("projection" in k for k in exported) and len(exported) == len(
            load_file(teacher_run / "encoder.safetensors")
        )
        for key in ("loss", "distill_cosine", "distill_smooth_l1", "image_loss", "text_loss"):
            assert all(key in r for r in rows[kind]), key
    assert [r["loss"] for r in rows["folder"]] == [r["loss"] for r in rows["file"]]  # the same teacher weights


@pytest.mark.slow
def test_kill9_and_resume_is_bit_identical_and_rebuilds_the_teacher(tmp_path, teacher_run):
    """As tests/test_train_loop.py's kill -9 test, with the AIMv2 part on: the killed run's resume reads the teacher
    again (no checkpoint has it) and ends on the uninterrupted run's weights and losses, bit for bit."""
    args = [*RUN, "train.steps=12", f"model.distill.teacher={teacher_run}", "model.distill.aimv2=0.5"]

    def cmd(out):  # every run in a child process of one thread: the same float summation order in all three
        return [sys.executable, "-m", "aimv2", "pretrain", CONFIG, *args, f"out_dir={out}"]

    ref, out = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(cmd(ref), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    kill9_after_checkpoint(cmd(out), out, 2)
    left = sorted((out / "checkpoints").glob("step_*.pt"))
    assert left and left[-1].name != "step_00000012.pt", "killed too late: nothing left to resume"
    subprocess.run(cmd(out), env=subprocess_env(), check=True, timeout=300, capture_output=True)
    a, b = load_file(ref / "encoder.safetensors"), load_file(out / "encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = read_metrics(ref), read_metrics(out)
    assert [r["step"] for r in rb] == list(range(1, 13))
    assert [r["loss"] for r in ra] == [r["loss"] for r in rb]
    assert all(r["text_loss"] > 0 and r["image_loss"] > 0 for r in ra)  # the AIMv2 part trains too


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "model.objective=distill needs model.distill.teacher="),
        (["model.distill.teacher=" + TINY, "model.distill.cosine=-1"], "model.distill.cosine=-1.0 is out of range"),
        (
            ["model.distill.teacher=" + TINY, "model.distill.cosine=0", "model.distill.smooth_l1=0"],
            "both 0, so nothing is distilled",
        ),
        (["model.distill.teacher=no/such/run"], "model.distill.teacher: 'no/such/run' is neither"),
        (["model.distill.teacher=missing.safetensors"], "model.distill.teacher:"),
    ],
    ids=["no-teacher", "negative-weight", "all-zero", "missing-folder", "missing-file"],
)
def test_bad_config_is_one_line(tmp_path, capsys, extra, message):
    code = main(["pretrain", CONFIG, *RUN, "train.steps=1", f"out_dir={tmp_path / 'run'}", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert err[0].startswith("aimv2 pretrain: error:")


def test_student_learns_the_teacher(tmp_path):
    """16 steps of configs/distill-tiny.yaml (at the tests' tiny size) on a random tiny teacher: the cosine distance
    to the teacher's features falls, the loss too."""
    out = tmp_path / "run"
    args = [
        *RUN,
        "train.steps=16",
        "train.checkpoint_every=16",
        f"model.distill.teacher={TINY}",
        "optim.warmup_steps=3",
    ]
    args += ["model.distill.teacher_overrides={depth: 2, img_size: 32}", f"out_dir={out}"]
    assert main(["pretrain", str(ROOT / "configs" / "distill-tiny.yaml"), *args]) == 0
    rows = read_metrics(out)
    first = sum(r["distill_cosine"] for r in rows[:3]) / 3
    last = sum(r["distill_cosine"] for r in rows[-3:]) / 3
    assert last < 0.5 * first, (first, last)
    assert sum(r["loss"] for r in rows[-3:]) < 0.5 * sum(r["loss"] for r in rows[:3])


def test_dry_run_counts_the_teacher_as_training_does(teacher_run):
    """`--dry-run` sizes the teacher without reading its weights (a model name, a run folder, a file's metadata) and
    measures a step's FLOPs as flops_per_sample (the MFU formula) counts them on the real model; a teacher it cannot
    size without its weights is one line."""
    from aimv2.config import ConfigError, load_config
    from aimv2.objectives import build_model
    from aimv2.train.dry_run import dry_run
    from aimv2.train.tasks import load_teacher

    path = ROOT / "configs" / "distill-tiny.yaml"
    for teacher in (f"{TINY}", str(teacher_run), str(teacher_run / "encoder.safetensors")):
        fill = [f"model.distill.teacher={teacher}", "model.distill.teacher_overrides={img_size: 32}"]
        r = dry_run(path, fill)
        cfg = load_config(path, fill)
        model = build_model(cfg, 521, 0, teacher=load_teacher(cfg))
        want = cfg.train.batch_size * flops_per_sample(model, 64, cfg.data.context_length)
        assert r.flops_per_step[0] == pytest.approx(want, rel=0.02), teacher
        assert r.params["total"] == sum(p.numel() for p in model.parameters())  # the teacher is not trained
    with pytest.raises(ConfigError, match="--dry-run sizes model.distill.teacher='hf:apple/x'"):
        dry_run(path, ["model.distill.teacher=hf:apple/x"])


def test_a_run_with_the_aimv2_part_reads_back_as_aimv2_for_captioning(tmp_path, teacher_run):
    """`aimv2 caption` and continued pretraining read a run folder back: a distillation run with the AIMv2 part is
    AIMv2's encoder + decoder (the projection stays behind); one without it has no decoder, which is said."""
    from aimv2.objectives import AIMv2Pretrainer
    from aimv2.weights import RunError, load_pretraining_run

    out = tmp_path / "run"
    args = [*RUN, "train.steps=1", f"model.distill.teacher={teacher_run}", "model.distill.aimv2=0.5"]
    assert main(["pretrain", CONFIG, *args, f"out_dir={out}"]) == 0
    run = load_pretraining_run(out)
    assert isinstance(run.model, AIMv2Pretrainer) and run.config.model.objective == "distill"
    exported = aimv2.create_model(None, checkpoint=out / "encoder.safetensors").state_dict()
    assert all(torch.equal(v, run.model.encoder.state_dict()[k]) for k, v in exported.items())
    images, text = objective_tests._batch()
    assert run.model(images, text.clamp(max=run.tokenizer.vocab_size - 1), prefix_len=3).text_logits.ndim == 3
    pure = tmp_path / "pure"
    assert main(["pretrain", CONFIG, *RUN, "train.steps=1", f"model.distill.teacher={TINY}", f"out_dir={pure}"]) == 0
    with pytest.raises(RunError, match="model.objective=distill: no caption decoder"):
        load_pretraining_run(pure)
