"""Everything distributed, applied to a plain model from outside, in torchtitan's order:
activation checkpointing, then torch.compile, then FSDP2 (``fully_shard`` per block, then the root)
or DDP. Model code stays free of torch.distributed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from ..config import TrainConfig
from ..models.attention import set_attention_backend
from .distributed import DistInfo


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The transformer block lists of the encoder and decoder (the units of AC, compile and sharding)."""
    return [m.blocks for m in model.modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)]


def apply_activation_checkpointing(model: nn.Module) -> None:
    for blocks in block_lists(model):
        for i, blk in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(blk, preserve_rng_state=False)


def apply_compile(model: nn.Module, dynamic: bool = False, backend: str = "inductor", whole: bool = False) -> None:
    """Compile in place (parameter names unchanged): each block, one graph reused by every layer of a stack, or
    with ``whole`` the model's forward as one graph.

    ``whole`` also fuses what lies between and around the blocks (patch embedding, masks, heads, losses) and
    drops the per-block call overhead: at the sizes of ``benchmarks/l3m_compare.py`` on a 2-core CPU the step was
    4-5% faster in fp32 and 5-17% in bf16 than compiled per block, in paired runs. Per block is what distributed runs
    need (each FSDP2 unit and each DDP bucket hook stays outside the graphs, so communication overlaps the
    backward) and what native resolution needs (its batches change shape every step, and one small graph
    recompiles less than the whole model). ``dynamic=True`` (native-resolution runs, whose batch size and sequence
    length change every step) compiles with symbolic shapes from the start, so a new (B, N) reuses the graph
    instead of recompiling; fixed-resolution runs keep static shapes (``dynamic=False``), the fastest kernels for
    their one shape. ``backend``: torch.compile's (``eager`` traces without generating code, for quick checks of
    the compiled code path)."""
    if whole:
        model.compile(dynamic=dynamic, backend=backend)
        return
    for blocks in block_lists(model):
        for blk in blocks:
            blk.compile(dynamic=dynamic, backend=backend)


def lm_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of any transformers model inside ``model`` (a VLM's LM): the modules whose class its
    ``_no_split_modules`` names (``LlamaDecoderLayer``, ...), transformers' own list of the units it never splits."""
    names = {n for m in model.modules() for n in (getattr(m, "_no_split_modules", None) or [])}
    return [m for m in model.modules() if type(m).__name__ in names]


def apply_fsdp(model: nn.Module, param_dtype: torch.dtype | None) -> nn.Module:
    """``fully_shard`` each of our blocks and each LM decoder layer (one all-gather per layer in flight instead of
    the whole LM's), then the root for the rest (embeddings, heads, the projector)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kw = {"mp_policy": mp} if mp else {}
    for blk in [b for blocks in block_lists(model) for b in blocks] + lm_layers(model):
        fully_shard(blk, **kw)
    fully_shard(model, **kw)
    return model


def parallelize(
    model: nn.Module, cfg: TrainConfig, info: DistInfo, device: torch.device, dynamic_shapes: bool = False
) -> nn.Module:
    """Returns the module to call in the training step (the same module, or its DDP wrapper).
    ``dynamic_shapes``: the batch and sequence length vary per step (native resolution); see apply_compile.
    ``cfg.compile`` compiles the whole model on one process at fixed shapes when the objective declares that its
    forward is one graph (``whole_graph``, objectives/base.py), each block otherwise (apply_compile).
    Also sets the attention backend of ``cfg.attention`` (process-wide, before anything is compiled)."""
    set_attention_backend(cfg.attention)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        whole = getattr(model, "whole_graph", False) and not info.distributed and not dynamic_shapes
        apply_compile(model, dynamic=dynamic_shapes, whole=whole)
    if not info.distributed:
        return model
    if cfg.parallel == "fsdp":
        return apply_fsdp(model, None)  # bf16 compute comes from autocast; params and grads stay fp32
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
