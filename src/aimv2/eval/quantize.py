"""int8 inference of a frozen encoder through torchao, the maintained PyTorch quantization library.

Two of torchao's recipes, applied in place to every ``nn.Linear`` of the trunk (attention and SwiGLU
projections: nearly all of the FLOPs; the patch embedding is a convolution and stays float32):

- ``dynamic``: int8 weights, per channel, and int8 activations quantized per token at run time
  (``Int8DynamicActivationInt8WeightConfig``); the matmul runs in int8 (``torch._int_mm``).
- ``weight-only``: int8 weights dequantized on the fly (``Int8WeightOnlyConfig``): a quarter of the weight
  memory, float32 arithmetic.

Whether either is faster than float32 depends on the machine and on ``torch.compile``, which fuses the
quantization of the activations into a few kernels; without it those run as a dozen separate element-wise ops per
linear layer. ``benchmarks/inference_speed.py`` measures it, and the feature cosine each loses.
"""

from __future__ import annotations

from torch import nn

INT8_MODES = ("dynamic", "weight-only")


def quantize_int8(model: nn.Module, mode: str = "dynamic") -> nn.Module:
    """``model`` with its linear layers quantized to int8 in place (and returned), for inference only."""
    if mode not in INT8_MODES:
        raise ValueError(f"unknown int8 mode {mode!r}: choose {', '.join(INT8_MODES)}")
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ImportError("int8 inference needs torchao: pip install 'aimv2[int8]'") from e
    config = Int8DynamicActivationInt8WeightConfig() if mode == "dynamic" else Int8WeightOnlyConfig()
    quantize_(model.eval(), config)
    return model
