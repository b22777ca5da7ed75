"""The attention backends (sdpa, matmul, flex) against softmax attention written out with a mask built by loops,
and the rule that chooses among them."""

import shutil
import warnings

import pytest
import torch

from aimv2.models import attention as attn
from aimv2.models.attention import AttentionMask, attend, choose_backend, set_attention_backend

B, H, N, HD = 3, 2, 9, 8
PREFIX = torch.tensor([4, 1, 9])
LENGTHS = torch.tensor([9, 6, 2])  # sample b has LENGTHS[b] real tokens, then padding keys

PATTERNS = {  # name -> (causal, prefix_len, key_valid)
    "prefix": (True, PREFIX, None),
    "prefix+padding": (True, PREFIX, torch.arange(N)[None] < LENGTHS[:, None]),
    "causal+padding": (True, None, torch.arange(N)[None] < LENGTHS[:, None]),
    "full+padding": (False, None, torch.arange(N)[None] < LENGTHS[:, None]),
    "causal": (True, None, None),
}


def loop_allowed(causal, prefix_len, key_valid) -> torch.Tensor:
    """bool [B, 1, N, N], one (sample, query, key) at a time from the definition."""
    out = torch.zeros(B, 1, N, N, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            for j in range(N):
                seen = (not causal) or j <= i or (prefix_len is not None and j < int(prefix_len[b]))
                out[b, 0, i, j] = seen and (key_valid is None or bool(key_valid[b, j]))
    return out


def reference(q, k, v, allowed):
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def qkv(dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, N, HD, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


@pytest.fixture(autouse=True)
def _auto_backend():
    yield
    set_attention_backend("auto")


@pytest.mark.parametrize("name", PATTERNS)
@pytest.mark.parametrize("backend", ["sdpa", "matmul", "explicit"])
def test_forward_and_gradients_equal_the_written_out_softmax(name, backend):
    causal, prefix, valid = PATTERNS[name]
    mask = AttentionMask(N, causal=causal, prefix_len=prefix, key_valid=valid)
    allowed = loop_allowed(causal, prefix, valid)
    q, k, v = qkv(grad=True)
    if backend == "explicit":  # a plain boolean tensor instead of the pattern
        set_attention_backend("sdpa")
        y = attend(q, k, v, allowed, is_causal=False)
    else:
        set_attention_backend(backend)
        y = attend(q, k, v, mask, is_causal=False)
    w = torch.randn_like(y)
    got = torch.autograd.grad((y * w).sum(), (q, k, v))
    q2, k2, v2 = qkv(grad=True)
    want_y = reference(q2, k2, v2, allowed)
    want = torch.autograd.grad((want_y * w).sum(), (q2, k2, v2))
    torch.testing.assert_close(y, want_y)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", [n for n in PATTERNS if n != "causal"])
def test_flex_block_mask_gives_the_same_forward_eager(name):
    """The block mask (the pattern's ``mask_mod``) in FlexAttention's eager forward, on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    causal, prefix, valid = PATTERNS[name]
    mask = AttentionMask(N, causal=causal, prefix_len=prefix, key_valid=valid)
    q, k, v = qkv(torch.float32)
    with warnings.catch_warnings():  # eager flex warns (once) that it is unfused; the values are what we check
        warnings.simplefilter("ignore")
        y = flex_attention(q, k, v, block_mask=mask.block_mask)
    torch.testing.assert_close(y, reference(q, k, v, loop_allowed(causal, prefix, valid)), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
    reason="compiled FlexAttention on CPU needs a C++ compiler (cc/gcc/clang), none found on PATH",
)
def test_compiled_flex_through_attend_on_cpu():
    """``attend`` with the flex backend forced: compiled FlexAttention (CPU forward only, no autograd)."""
    causal, prefix, valid = PATTERNS["prefix+padding"]
    mask = AttentionMask(N, causal=causal, prefix_len=prefix, key_valid=valid)
    set_attention_backend("flex")
    q, k, v = qkv(torch.float32)
    with torch.no_grad():
        y = attend(q, k, v, mask, is_causal=False)
    assert attn._compiled_flex is not None
    torch.testing.assert_close(y, reference(q, k, v, loop_allowed(causal, prefix, valid)), atol=1e-5, rtol=1e-5)


def test_bf16_matmul_and_sdpa_agree_with_the_fp32_reference():
    causal, prefix, valid = PATTERNS["prefix+padding"]
    mask = AttentionMask(N, causal=causal, prefix_len=prefix, key_valid=valid)
    q, k, v = qkv(torch.float32)
    want = reference(q, k, v, loop_allowed(causal, prefix, valid))
    for backend in ("sdpa", "matmul"):
        set_attention_backend(backend)
        y = attend(*(t.bfloat16() for t in (q, k, v)), mask, is_causal=False)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), want, atol=3e-2, rtol=3e-2)


CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "device,dtype,n,masked,grad,forced,want",
    [
        (CPU, torch.bfloat16, 96, True, True, "auto", "matmul"),  # below the crossover: the plain way
        (CPU, torch.bfloat16, 96, False, True, "auto", "matmul"),  # the causal flag too
        (CPU, torch.bfloat16, 100_000, True, True, "auto", "sdpa"),  # past it: the fused kernel
        (CPU, torch.float32, 96, True, True, "auto", "sdpa"),  # fp32: fused wins at every length measured
        (CUDA, torch.bfloat16, 333, True, True, "auto", "flex"),  # a prefix or padding on CUDA
        (CUDA, torch.bfloat16, 333, False, True, "auto", "sdpa"),  # full / causal: the flash kernel's flags
        (CPU, torch.bfloat16, 96, True, True, "sdpa", "sdpa"),  # forced
        (CPU, torch.float32, 96, True, False, "flex", "flex"),  # flex forward runs on CPU
        (CPU, torch.float32, 96, True, True, "flex", "sdpa"),  # but has no CPU backward
        (CUDA, torch.float32, 96, False, True, "matmul", "matmul"),
    ],
)
def test_dispatch_rule(device, dtype, n, masked, grad, forced, want):
    assert choose_backend(device, dtype, n, masked, grad, forced) == want


@pytest.mark.parametrize(
    "dtype,n,want",
    [
        (torch.bfloat16, 256, "matmul"),  # the encoder at 224 px: past the eager crossover, within the compiled one
        (torch.bfloat16, 333, "matmul"),  # the decoder (256 image + 77 text positions)
        (torch.bfloat16, 512, "sdpa"),
        (torch.float32, 96, "sdpa"),  # fp32 keeps the fused kernel compiled too
    ],
)
def test_dispatch_rule_inside_compile(dtype, n, want):
    assert choose_backend(CPU, dtype, n, True, True, "auto", compiled=True) == want
    assert choose_backend(CUDA, dtype, n, True, True, "auto", compiled=True) == "flex"  # the rule is CPU's only


@pytest.mark.parametrize(
    "record,table",
    [
        ("attention_crossover_cpu.json", "CPU_MATMUL_UP_TO"),
        ("attention_crossover_cpu_compiled.json", "CPU_MATMUL_UP_TO_COMPILED"),
    ],
)
def test_rule_table_follows_the_recorded_crossover(record, table):
    import json
    from pathlib import Path

    rec = json.loads((Path(__file__).parents[1] / "benchmarks/results" / record).read_text())
    assert rec.get("compiled", False) == table.endswith("COMPILED")
    names = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for name, n in rec["matmul_faster_up_to"].items():
        assert getattr(attn, table).get(names[name]) == n, f"{table} disagrees with the record for {name}"


@pytest.mark.parametrize("prefix", [torch.tensor([100, 1, 256]), None])
def test_compiled_attend_takes_the_matmul_way_and_matches_the_reference(prefix, monkeypatch):
    """Inside torch.compile on CPU in bf16 at 256 tokens (past the eager crossover, within the compiled one) attend()
    takes the two-matmul way, the causal bias built in the graph rather than from the eager cache, and its values
    and gradients match the written-out softmax."""
    n = 256
    mask = AttentionMask(n, causal=True, prefix_len=prefix)
    taken = []
    real = attn.matmul_attention
    monkeypatch.setattr(attn, "matmul_attention", lambda *a: taken.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, n, HD, generator=g).bfloat16().requires_grad_() for _ in range(3))
    fn = torch.compile(lambda q, k, v: attend(q, k, v, mask, is_causal=True), backend="eager", fullgraph=True)
    y = fn(q, k, v)
    assert taken, "the compiled call did not take the matmul way"
    y.float().sum().backward()
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (j <= i)[None, None] | (
        j[None, None] < (prefix if prefix is not None else torch.zeros(B))[:, None, None, None]
    )
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference(q64, k64, v64, allowed)
    want.sum().backward()
    torch.testing.assert_close(y.double(), want, atol=3e-2, rtol=3e-2)
    for got, ref in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=5e-2, rtol=5e-2)


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(ValueError, match="auto|sdpa|flex|matmul"):
        set_attention_backend("fast")


def test_train_attention_key_sets_the_backend_for_the_run(tmp_path):
    """``train.attention=...`` on the command line reaches attend() through parallelize (the trainer's setup)."""
    from aimv2.config import load_config
    from aimv2.train.distributed import DistInfo
    from aimv2.train.parallelize import parallelize

    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 1}\n")
    cfg = load_config(path, ["train.attention=matmul"])
    parallelize(torch.nn.Linear(2, 2), cfg.train, DistInfo(), torch.device("cpu"))
    assert attn.attention_backend() == "matmul"
    with pytest.raises(ValueError, match=r"train.attention must be auto\|sdpa\|flex\|matmul, got 'fast'"):
        load_config(path, ["train.attention=fast"])  # refused where it enters, before any model is built


def test_config_knows_the_same_backends_as_the_models():
    from aimv2.config.checks import ATTENTION_BACKENDS

    assert ATTENTION_BACKENDS == attn.BACKENDS
