"""A mixture-of-experts decoder (``model.decoder.moe``): the layer against a token-by-token re-implementation of
megablocks' dMoE routing and its load-balancing loss, the objective's loss and gradients, no leakage (the AIMv2
leakage tests rerun on an MoE decoder), and a run that trains, logs the balance loss and resumes bit-identically."""

import shutil

import pytest
import test_pretrain_objective as objective_tests
import torch
import torch.nn.functional as F
from conftest import ROOT, TINY_RUN, read_metrics
from safetensors.torch import load_file

import aimv2
from aimv2.cli import main
from aimv2.config.parse import resolve_config
from aimv2.models.moe import MoEConfig, MoESwiGLU

MOE = {"experts": 4, "top_k": 1, "balance_weight": 0.01}  # l3m's AIMv2-MoE


def naive_moe(layer: MoESwiGLU, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: softmax router, top-k experts weighted by their (unnormalised) probabilities; balance as
    megablocks computes it for one layer, E / (T k) * sum_e count_e * mean_t p[t, e]."""
    tokens = x.reshape(-1, x.shape[-1])
    E, k = layer.cfg.experts, layer.cfg.top_k
    out, counts, probs_all = [], torch.zeros(E), []
    for t in tokens:
        p = torch.softmax(t @ layer.router.weight.T, dim=-1)
        probs_all.append(p)
        y = torch.zeros_like(t)
        for e in torch.argsort(p, descending=True)[:k].tolist():
            h = F.silu(layer.fc1[e] @ t) * (layer.fc3[e] @ t)
            y = y + p[e] * (layer.fc2[e] @ h)
            counts[e] += 1
        out.append(y)
    probs = torch.stack(probs_all)
    balance = E / (len(tokens) * k) * (counts * probs.mean(0)).sum()
    return torch.stack(out).reshape(x.shape), balance


@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_matches_a_token_by_token_reference(top_k):
    torch.manual_seed(0)
    layer = MoESwiGLU(16, 32, MoEConfig(experts=4, top_k=top_k))
    x = torch.randn(3, 5, 16)
    out = layer(x)
    ref, balance = naive_moe(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.balance, balance, rtol=1e-5, atol=1e-7)


def test_balance_is_one_when_routing_is_uniform_and_grows_when_it_collapses():
    torch.manual_seed(0)
    layer = MoESwiGLU(8, 16, MoEConfig(experts=4))
    with torch.no_grad():
        layer.router.weight.zero_()  # every token: probabilities 1/4 each, all routed to one expert (argmax tie)
    layer(torch.randn(2, 6, 8))
    assert layer.balance.item() == pytest.approx(1.0)  # E * (1 * 1/4): collapse with uniform probabilities
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 50.0  # tokens with x_0 > 0 go to expert 0 with probability ~1
    x = torch.randn(2, 6, 8).abs()
    layer(x)
    assert layer.balance.item() == pytest.approx(4.0, rel=1e-3)  # all on one expert with p ~ 1: the maximum, E


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(experts=2, top_k=3)
    with pytest.raises(ValueError, match="unknown moe option"):
        aimv2.create_pretraining_model("aimv2-tiny-patch8-32", vocab_size=10, decoder_moe={"expert": 4})


def test_baselines_refuse_moe_with_one_line(capsys):
    """Only the AIMv2 objective adds the balance loss: a baseline with experts is refused, not silently unbalanced."""
    config = str(ROOT / "configs" / "tiny-synthetic.yaml")
    code = main(["pretrain", config, "model.objective=cap", "model.decoder={moe: {experts: 2}}", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.decoder.moe is for model.objective=aimv2" in err[0], err


def moe_model(**kw):
    torch.manual_seed(0)
    kw.setdefault("depth", 2)
    kw.setdefault("decoder_depth", 2)
    return aimv2.create_pretraining_model(
        "aimv2-tiny-patch8-64", vocab_size=objective_tests.V, decoder_moe=MOE, **kw
    ).eval()


def test_loss_adds_the_weighted_balance_and_every_parameter_gets_a_gradient():
    model = moe_model(img_size=32).train()
    images, text = objective_tests._batch()
    out = model(images, text, prefix_len=torch.tensor([1, 8]))
    assert out.image_pred.shape == (2, 15, 8 * 8 * 3) and out.text_logits.shape == (2, 7, objective_tests.V)
    balance = torch.stack([b.mlp.balance for b in model.decoder.blocks]).mean()
    want = out.text_loss + 0.4 * out.image_loss + 0.01 * balance
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=0)
    counts = model.loss_counts(images, text, torch.tensor([1, 8]))
    assert set(counts) == set(out.terms.counts) and counts["balance_loss"].item() == 1
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, missing  # every expert of every block was chosen by some token and reached
    assert any(".mlp.fc1" in n and p.ndim == 3 for n, p in model.named_parameters())
    assert not model.whole_graph  # data-dependent routes break graphs: compiled per block


@pytest.mark.parametrize("check", objective_tests.LEAK_CHECKS, ids=objective_tests.LEAK_CHECK_IDS)
def test_no_leakage_with_experts(check, monkeypatch):
    """Dropless routing is per token, so the AIMv2 leakage tests hold as they are on an MoE decoder."""
    monkeypatch.setattr(objective_tests, "_model", moe_model)
    check()


def test_image_predictions_ignore_the_caption():
    """As the dense test, to rounding: the experts' matmuls group tokens by route, so another caption changes which
    rows share a matmul (and its blocking, ~1e-7), never what an image position reads."""
    model = moe_model()
    images, text = objective_tests._batch()
    base = model(images, text, prefix_len=3)
    other = model(images, torch.randint(3, objective_tests.V, text.shape), prefix_len=3)
    torch.testing.assert_close(other.image_pred, base.image_pred, rtol=0, atol=1e-5)
    moved = model(objective_tests.perturb_from(images, 15, 8), text, prefix_len=3)  # only the last patch changes
    assert (moved.text_logits[:, 0] - base.text_logits[:, 0]).abs().amax() > 1e-4


def test_paper_config_is_l3ms_moe_and_dry_runs():
    """configs/paper/aimv2-moe-224.yaml: l3m's AIMv2-MoE numbers (4 experts, top-1, balance 0.01, ViT-B encoder, the
    paper's 1024 x 12 decoder, lr 2e-3, 250k steps); its dry run measures the FLOPs of balanced top-1 routing: those
    of the dense model plus the routers (2 x 1024 x 4 per token and block, times 3 for the backward)."""
    from aimv2.train.dry_run import dry_run

    path = ROOT / "configs" / "paper" / "aimv2-moe-224.yaml"
    fill = ["data.shards=a/{0..3}.tar", "data.tokenizer=x.model"]
    r = dry_run(path, fill)
    dense = dry_run(path, [*fill, "model.decoder={}"])
    assert r.params["encoder"] == dense.params["encoder"] == 85_603_584  # 768 x 12, 6 heads (l3m's ViT-B)
    d = 1024 * 12  # decoder width x depth: each block has 4 experts of the dense SwiGLU and a router
    assert r.params["decoder"] - dense.params["decoder"] == d * (3 * 3 * 2816 + 4)
    router = 3 * 2 * 1024 * 4 * 12 * (256 + 77) * 8192
    assert r.flops_per_step[0] - dense.flops_per_step[0] == pytest.approx(router, rel=1e-6)
    cfg, _ = resolve_config(path, fill)
    assert (cfg.optim.lr, cfg.train.steps, cfg.model.decoder["moe"]) == (2e-3, 250_000, MOE)


def test_run_trains_logs_balance_and_resumes_bit_identically(tmp_path):
    args = [*TINY_RUN, "model.decoder={embed_dim: 64, depth: 1, num_heads: 2, mlp_hidden_dim: 128, moe: {experts: 4}}"]
    args += ["train.steps=2", "train.checkpoint_every=1", "train.progress=false"]
    ref = tmp_path / "ref"
    config = str(ROOT / "configs" / "tiny-synthetic.yaml")
    assert main(["pretrain", config, *args, f"out_dir={ref}"]) == 0
    rows = read_metrics(ref)
    assert len(rows) == 2 and all(r["balance_loss"] >= 1.0 - 1e-6 for r in rows)  # E * sum f P >= 1
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    (resumed / "checkpoints" / "step_00000002.pt").unlink()  # as if killed after the step-1 checkpoint
    (resumed / "encoder.safetensors").unlink()
    assert main(["pretrain", config, *args, f"out_dir={resumed}"]) == 0
    a, b = load_file(ref / "encoder.safetensors"), load_file(resumed / "encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(resumed)]
    sa = torch.load(ref / "checkpoints" / "step_00000002.pt", weights_only=True)["model"]
    sb = torch.load(resumed / "checkpoints" / "step_00000002.pt", weights_only=True)["model"]
    assert any("router" in k for k in sa) and all(torch.equal(sa[k], sb[k]) for k in sa)
