"""int8 inference of a frozen encoder through torchao, the maintained PyTorch quantization library.

Two of torchao's recipes, applied in place to every ``nn.Linear`` of the trunk (attention and SwiGLU
projections: nearly all of the FLOPs; the patch embedding is a convolution and stays float32):

- ``dynamic``: int8 weights, per channel, and int8 activations quantized per token at run time
  (``Int8DynamicActivationInt8WeightConfig``); the matmul runs in int8 (``torch._int_mm``). This is what
  ``--dtype int8`` of ``extract``, ``probe``, ``classify`` and ``zeroshot`` applies.
- ``weight-only``: int8 weights dequantized on the fly (``Int8WeightOnlyConfig``): a quarter of the weight
  memory, float32 arithmetic.

Whether either is faster than float32 depends on the machine and on ``torch.compile``, which fuses the
quantization of the activations into a few kernels; without it those run as a dozen separate element-wise ops per
linear layer. ``benchmarks/inference_speed.py`` measures it, and the feature cosine and probe top-1 each loses.

The dtypes of inference, in one place: ``fp32``, ``bf16`` and ``fp16`` are an autocast of the forward over the
float32 weights (the model is not touched); ``int8`` changes the model itself, once, before any forward.
"""

from __future__ import annotations

import logging

from torch import nn

from ..errors import MissingPackageError

INT8_MODES = ("dynamic", "weight-only")
INFERENCE_DTYPES = ("fp32", "bf16", "fp16", "int8")


def _torchao_quantization():
    """torchao's quantization module, or the one-line error that names the extra to install."""
    # torchao 0.18 registers an enum with torch.compile at import, which torch 2.14 answers with a deprecation
    # line on stderr; it concerns torchao, not the user, so it is silenced for the import
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.quantization as q
    except ImportError as e:
        raise MissingPackageError(
            "int8 inference needs torchao, which is not installed; pip install 'aimv2[int8]', or choose --dtype "
            "fp32, bf16 or fp16"
        ) from e
    finally:
        pytree_log.setLevel(level)
    return q


def quantize_int8(model: nn.Module, mode: str = "dynamic") -> nn.Module:
    """``model`` with its linear layers quantized to int8 in place (and returned), for inference only.

    A model already quantized is returned as it is (quantizing int8 weights again is not defined)."""
    if mode not in INT8_MODES:
        raise ValueError(f"unknown int8 mode {mode!r}: choose {', '.join(INT8_MODES)}")
    q = _torchao_quantization()
    if is_int8(model):
        return model
    config = q.Int8DynamicActivationInt8WeightConfig() if mode == "dynamic" else q.Int8WeightOnlyConfig()
    q.quantize_(model.eval(), config)
    return model


def is_int8(model: nn.Module) -> bool:
    """Whether any weight of ``model`` is one of torchao's quantized tensors (a tensor subclass in its place)."""
    return any(type(p).__module__.startswith("torchao.") for p in model.parameters())


def check_dtype(dtype: str) -> None:
    """Whether ``dtype`` can run here, before any weights are read: ValueError for an unknown one, and for int8
    without torchao the :class:`~aimv2.errors.MissingPackageError` that names the extra to install."""
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"unknown inference dtype {dtype!r}: choose {', '.join(INFERENCE_DTYPES)}")
    if dtype == "int8":
        _torchao_quantization()


def for_inference(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` as ``dtype`` runs it: ``int8`` quantizes its linear layers in place (torchao, ``dynamic``); the
    autocast dtypes leave it as it is (the forward casts)."""
    check_dtype(dtype)
    return quantize_int8(model, "dynamic") if dtype == "int8" else model
