"""bf16 on a CPU without native bf16 matmuls: the trainer warns, and the predicate behind it matches the hardware."""

import logging
import types

import pytest
import torch

from aimv2.train import precision, trainer


def cfg(precision_: str):
    return types.SimpleNamespace(train=types.SimpleNamespace(precision=precision_))


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_on_the_cpu_warns_only_where_it_is_slow(monkeypatch, caplog, fast):
    monkeypatch.setattr(trainer, "cpu_bf16_is_fast", lambda: fast)
    with caplog.at_level(logging.WARNING, logger="aimv2.train"):
        ctx = trainer.autocast_for(cfg("bf16"), torch.device("cpu"))
        with ctx():
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
        trainer.autocast_for(cfg("fp32"), torch.device("cpu"))
        trainer.autocast_for(cfg("auto"), torch.device("cpu"))  # fp32 on the CPU
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == (0 if fast else 1), warned  # once, for bf16 only
    if not fast:
        assert "train.precision=bf16" in warned[0] and "train.precision: fp32" in warned[0]


def test_the_predicate_is_pytorchs_own_and_agrees_with_a_measurement():
    # Where PyTorch says it has no native bf16 matmul, bf16 is several times slower than fp32: the warning is true.
    # (Where it says it has one, bf16 may still be near fp32 speed, e.g. AVX-512 without BF16: nothing to check.)
    assert precision.cpu_bf16_is_fast() == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if not precision.cpu_bf16_is_fast():
        speeds = precision.matmul_speeds(n=256, reps=3)
        assert speeds["bf16"] < speeds["fp32"] / 2, speeds
