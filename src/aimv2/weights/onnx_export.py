"""The encoder as an ONNX graph: ``pixels`` float32 [B, 3, H, W] -> ``features`` float32 [B, N, D].

``torch.onnx.export`` (the ``torch.export`` path, with ``onnxscript``) does the work; what is ours is which sizes
stay free. The batch always does. H and W do for a sin-cos (native) encoder, as multiples of the patch size,
because its position embedding is computed from the grid inside the graph; a learned embedding is fixed to the
model's own grid (resizing it is an interpolation we keep out of the graph: export at the size you run).
:func:`check_onnx` runs the file in onnxruntime against the PyTorch model.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..models.encoder import VisionEncoder

MAX_GRID = 512  # the largest patch grid side an exported native graph accepts (512 * 14 = 7168 px)
# A protobuf message cannot exceed 2 GiB, so larger weights go to a second file, ``OUT.onnx.data``, that must stay
# beside the graph. Below this (AIMv2-L and smaller: 1.2 GB) the weights are inside the one file, which can be
# copied or served alone.
MAX_SINGLE_FILE_BYTES = 2**31 - 2**27  # 2 GiB less 128 MiB for the graph itself
# The opsets an export can be written in (torch 2.14's exporter, onnxscript, onnxruntime 1.31): the exporter builds
# opset 18 graphs and converts them up or down; down (17 and lower) goes through onnx's version converter, which
# fails on this graph and leaves it at 18; 26 and up come out as invalid graphs (RMSNormalization inside an opset-18
# label). tests/test_onnx.py checks both ends.
OPSETS = range(18, 26)


def check_opset(opset: int | None) -> None:
    """Refuse an opset the export cannot write (:data:`OPSETS`), before any work."""
    if opset is not None and opset not in OPSETS:
        raise ValueError(
            f"ONNX opset {opset} cannot be written (--opset); give one of {OPSETS[0]} to {OPSETS[-1]}, "
            "or leave it out for the exporter's default"
        )


def weights_file(path: str | os.PathLike) -> Path:
    """Where an export of ``path`` keeps its weights when they are too large for the graph file."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def needs_external_data(model: torch.nn.Module) -> bool:
    """Whether ``model``'s tensors are too large to sit inside one ONNX file (:data:`MAX_SINGLE_FILE_BYTES`)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) > MAX_SINGLE_FILE_BYTES


def onnx_input_shape(model: VisionEncoder, batch: int = 2, grid: tuple[int, int] | None = None) -> tuple[int, ...]:
    """A [B, 3, H, W] input of ``model``: its own size, or ``grid`` patches (sin-cos models)."""
    p = model.cfg.patch_size
    h, w = model.cfg.image_hw if grid is None else (grid[0] * p, grid[1] * p)
    return (batch, model.cfg.in_chans, h, w)


def export_onnx(model: VisionEncoder, path: str | os.PathLike, opset: int | None = None) -> Path:
    """Write ``model`` (in eval mode, float32, on the CPU) to ``path`` as ONNX with a dynamic batch, and dynamic
    H, W for a sin-cos encoder. The weights are inside the file, or in :func:`weights_file` beside it where they
    are over 2 GiB (:func:`needs_external_data`); a weights file of an earlier export that this one does not
    use is removed, so none is left that belongs to another graph."""
    from torch.export import Dim

    check_opset(opset)
    model = model.eval()
    p = model.cfg.patch_size
    dims = {0: Dim("batch", min=1, max=4096)}
    if model.cfg.pos_embed == "sincos":
        dims.update({2: p * Dim("grid_h", min=1, max=MAX_GRID), 3: p * Dim("grid_w", min=1, max=MAX_GRID)})
    # an example of other sizes than 1, so that nothing specializes on them
    example = torch.zeros(onnx_input_shape(model, 2, (3, 2) if model.cfg.pos_embed == "sincos" else None))
    return export_module(model, example, dims, path, opset=opset, names=("pixels", "features"))


def export_module(
    module: torch.nn.Module,
    example: torch.Tensor,
    dims: dict,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    names: tuple[str, str] = ("pixels", "features"),
) -> Path:
    """Write ``module`` (one tensor in, one out; eval mode, CPU) to ``path`` as ONNX, the input's dimensions in
    ``dims`` ({axis: torch.export.Dim}) left free. The weights go to :func:`weights_file` beside the graph when
    they are over 2 GiB (:func:`needs_external_data`), else inside it; a stale weights file is removed."""
    module = module.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = needs_external_data(module)
    with warnings.catch_warnings():  # the position-embedding cache is a side effect torch.export notes, harmlessly
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            module,
            (example,),
            path,
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_shapes={_forward_arg(module): dims},
            opset_version=opset,
            dynamo=True,
            external_data=external,
            verbose=False,
        )
    if not external:
        weights_file(path).unlink(missing_ok=True)
    if opset is not None and (written := written_opset(path)) != opset:  # the exporter falls back without an error
        path.unlink()
        weights_file(path).unlink(missing_ok=True)
        raise ValueError(f"the exporter wrote ONNX opset {written}, not {opset} ({path}, removed); leave --opset out")
    return path


def written_opset(path: str | os.PathLike) -> int:
    """The default-domain opset an ONNX file declares (its weights are not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _forward_arg(module: torch.nn.Module) -> str:
    """The name of the first argument of ``module.forward`` (torch.export keys dynamic shapes by it)."""
    import inspect

    return next(iter(inspect.signature(module.forward).parameters))


def check_onnx(path: str | os.PathLike, model: VisionEncoder, shapes: list[tuple[int, ...]]) -> float:
    """The largest |onnxruntime - PyTorch| over inputs of ``shapes`` (random normal pixels), float32 CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(shape, generator=gen)
        (got,) = session.run(["features"], {"pixels": x.numpy()})
        with torch.no_grad():
            want = model.eval()(x)
        worst = max(worst, float((torch.from_numpy(got) - want).abs().max()))
    return worst
