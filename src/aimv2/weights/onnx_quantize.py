"""int8 ONNX graphs through ``onnxruntime.quantization``, the quantizer maintained with the runtime that runs them.

Two recipes, both on the MatMul and Gemm weights of the graph (attention and MLP projections: nearly all of the
FLOPs of a ViT) with int8 weights:

- ``dynamic``: activations quantized per call from their own range (``quantize_dynamic``): no calibration data,
  and on x86 CPUs the int8 GEMMs of onnxruntime's ``MatMulInteger`` kernels;
- ``static``: activation ranges fixed beforehand from calibration images (``quantize_static``, QDQ format), so
  no range is computed at run time; it needs images like the ones that will be encoded.

``per_channel``: one weight scale per output channel instead of one per matrix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

INT8_MODES = ("dynamic", "static")


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over an iterable of input arrays."""

    def __init__(self, name: str, batches: Iterable[np.ndarray]):
        self.name = name
        self.batches = iter(batches)

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        return None if batch is None else {self.name: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:  # one pass is all MinMax calibration needs
        pass


def quantize_onnx(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    mode: str = "dynamic",
    per_channel: bool = False,
    calibration: Iterable[np.ndarray] | None = None,
    input_name: str = "pixels",
    external_data: bool = False,
) -> Path:
    """Write the int8 version of the float32 graph ``src`` to ``dst`` (see the module docstring for ``mode`` and
    ``per_channel``). ``calibration``: float32 input batches for ``static``. ``external_data``: keep the weights
    in ``dst.data`` beside the graph (for graphs over 2 GiB)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if mode not in INT8_MODES:
        raise ValueError(f"unknown int8 mode {mode!r}: choose {', '.join(INT8_MODES)}")
    dst = Path(dst)
    ops = ["MatMul", "Gemm"]
    src = _without_value_info(src, dst.with_name(dst.stem + ".float.onnx"), external_data)
    if mode == "dynamic":
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=per_channel, op_types_to_quantize=ops,
                         use_external_data_format=external_data)  # fmt: skip
        return _done(src, dst)
    if calibration is None:
        raise ValueError("static int8 needs calibration images")
    quantize_static(
        src,
        dst,
        _Batches(input_name, calibration),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=ops,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        use_external_data_format=external_data,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    return _done(src, dst)


def _without_value_info(src, tmp: Path, external_data: bool) -> Path:
    """A copy of ``src`` without the exporter's intermediate shape annotations: the quantizer runs ONNX shape
    inference again, which refuses some of them (the transposed weight of a Gemm), and needs none of them."""
    import onnx

    model = onnx.load(str(src))
    del model.graph.value_info[:]
    onnx.save(model, str(tmp), save_as_external_data=external_data, location=tmp.name + ".data")
    return tmp


def _done(tmp: Path, dst: Path) -> Path:
    tmp.unlink(missing_ok=True)
    tmp.with_name(tmp.name + ".data").unlink(missing_ok=True)
    return dst
