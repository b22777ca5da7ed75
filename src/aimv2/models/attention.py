"""Who may attend whom, described as data, and the one function that computes attention with it.

Three patterns occur in AIMv2 and its uses:

    full       every query sees every key                      (inference, probes, the LiT image tower)
    causal     query i sees keys j <= i                        (the decoder, the text tower)
    prefix     causal, plus keys j < prefix_len[b] for every   (the encoder during pretraining: its first
               query of sample b                                prefix_len[b] patches are bidirectional)

and any of them may have padding keys (``key_valid[b, j] == False``) that no query attends, when samples of
different lengths share a batch. :class:`AttentionMask` holds the pattern instead of a materialized
[B, 1, N, N] tensor, so :func:`attend` can hand each backend the form it runs fastest with:

    sdpa     ``F.scaled_dot_product_attention``: the ``is_causal`` flag where that is exact, a boolean mask
             otherwise. The default wherever nothing below is faster.
    flex     FlexAttention (``torch.nn.attention.flex_attention``) with a block mask built from ``prefix_len``
             and ``key_valid``: on CUDA it skips the fully masked tiles and never materializes [N, N], where
             SDPA with a mask falls back to a slower kernel. Chosen on CUDA for prefix and padding masks.
    matmul   ``softmax(q k^T / sqrt(d)) v`` as two matmuls. On CPU in bf16 the fused kernel is slower than
             this at our sequence lengths (``benchmarks/attention_crossover.py``), so there it is chosen up to
             the measured crossover length (:data:`CPU_MATMUL_UP_TO`; inside ``torch.compile``, where its mask,
             softmax and casts fuse into one kernel, :data:`CPU_MATMUL_UP_TO_COMPILED`).

``auto`` applies :func:`choose_backend`; :func:`set_attention_backend` (or ``train.attention`` in a config)
forces one. Masks are boolean with ``True`` meaning "may attend". A query row is never fully masked: key 0 is
always a real token and every pattern lets every query see it, so no softmax sees only -inf.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "flex", "matmul")

# Longest sequence at which the two-matmul attention beat the fused CPU kernel, per dtype, in a training step's
# forward + backward (benchmarks/results/attention_crossover_cpu.json, which the benchmark prints in this form).
# A dtype missing here always takes SDPA on CPU.
CPU_MATMUL_UP_TO: dict[torch.dtype, int] = {torch.bfloat16: 192}
# The same inside torch.compile (attention_crossover.py --compile: attention_crossover_cpu_compiled.json). In fp32
# neither way wins at every length there, so fp32 keeps the fused kernel.
CPU_MATMUL_UP_TO_COMPILED: dict[torch.dtype, int] = {torch.bfloat16: 333}

_forced = "auto"  # set_attention_backend()


def set_attention_backend(name: str) -> None:
    """Use backend ``name`` (auto | sdpa | flex | matmul) for every attention computed from now on.

    ``auto`` (the default) chooses per device, dtype and sequence length (:func:`choose_backend`). ``flex``
    falls back to SDPA where FlexAttention cannot run (on CPU under autograd, which it does not support)."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: choose one of {'|'.join(BACKENDS)}")
    _forced = name


def attention_backend() -> str:
    """The backend set by :func:`set_attention_backend` (``auto`` unless one was forced)."""
    return _forced


def choose_backend(
    device: torch.device,
    dtype: torch.dtype,
    seq_len: int,
    masked: bool,
    needs_grad: bool,
    forced: str = "auto",
    compiled: bool = False,
) -> str:
    """The backend that computes one attention call: sdpa | flex | matmul.

    masked: the pattern is more than full or plain causal (a prefix or padding keys), i.e. SDPA needs a mask.
    needs_grad: autograd records the call (FlexAttention has no CPU backward).
    compiled: the call is traced by torch.compile (its crossover on CPU is longer)."""
    if forced == "flex":
        return "sdpa" if device.type == "cpu" and needs_grad else "flex"
    if forced != "auto":
        return forced
    if device.type == "cuda":
        return "flex" if masked else "sdpa"  # unmasked: SDPA's flash kernel with or without is_causal
    up_to = CPU_MATMUL_UP_TO_COMPILED if compiled else CPU_MATMUL_UP_TO
    if device.type == "cpu" and seq_len <= up_to.get(dtype, 0):
        return "matmul"
    return "sdpa"


@dataclass(eq=False)
class AttentionMask:
    """The attention pattern of one forward pass over sequences of ``seq_len`` tokens.

    causal: query i sees keys j <= i.
    prefix_len: [B] long, with ``causal``: keys j < prefix_len[b] are also seen by every query of sample b.
        A prefix of 0 or 1 is plain causal; ``seq_len`` is full attention.
    key_valid: [B, N] bool, False at padding keys (seen by no query). Key 0 must be valid.

    The forms the backends take (:attr:`dense`, :attr:`block_mask`) are built on first use and kept, so every
    layer of a forward pass shares them. On CUDA the block mask is built with the mask, i.e. before the first
    (possibly compiled) block runs, so a compiled block never traces its construction.
    """

    seq_len: int
    causal: bool = False
    prefix_len: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None
    _dense: torch.Tensor | None = field(init=False, repr=False, default=None)
    _block_mask: object | None = field(init=False, repr=False, default=None)
    _additive: torch.Tensor | None = field(init=False, repr=False, default=None)

    def __post_init__(self):
        if self.prefix_len is not None and not self.causal:
            raise ValueError("prefix_len needs causal=True (a prefix is the bidirectional start of a causal mask)")
        if self.masked and self.device.type == "cuda" and attention_backend() in ("auto", "flex"):
            self._block_mask = self.build_block_mask()

    @property
    def is_plain_causal(self) -> bool:
        return self.causal and self.prefix_len is None and self.key_valid is None

    @property
    def is_full(self) -> bool:
        return not self.causal and self.key_valid is None

    @property
    def masked(self) -> bool:
        """True where SDPA needs an explicit mask (a prefix or padding keys)."""
        return not (self.is_full or self.is_plain_causal)

    @property
    def device(self) -> torch.device:
        t = self.prefix_len if self.prefix_len is not None else self.key_valid
        return t.device if t is not None else torch.device("cpu")

    @property
    def dense(self) -> torch.Tensor | None:
        """The pattern as a boolean [B or 1, 1, N, N] tensor (built once); None where full or plain causal."""
        if self._dense is None and self.masked:
            self._dense = self.materialize()
        return self._dense

    @property
    def additive(self) -> torch.Tensor | None:
        """:attr:`dense` as float32 0 / -inf (built once), the form the two-matmul attention adds to its scores."""
        if self._additive is None and self.masked:
            self._additive = additive_mask(self.dense)
        return self._additive

    @property
    def block_mask(self):
        """The pattern as FlexAttention's ``BlockMask`` (built once); None where full or plain causal."""
        if self._block_mask is None and self.masked:
            self._block_mask = self.build_block_mask()
        return self._block_mask

    def allows(self, b: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Whether query ``q_idx`` of sample ``b`` may attend key ``kv_idx`` (broadcasting index tensors).

        The one statement of the rule: :meth:`materialize` evaluates it on a grid, FlexAttention as its
        ``mask_mod``."""
        allowed = kv_idx <= q_idx if self.causal else torch.ones_like(kv_idx <= q_idx)
        if self.prefix_len is not None:
            allowed = allowed | (kv_idx < self.prefix_len[b])
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[b, kv_idx]
        return allowed

    def batch_size(self) -> int:
        """Samples the pattern distinguishes: 1 where it is the same for all (broadcast over the batch)."""
        sizes = [t.shape[0] for t in (self.prefix_len, self.key_valid) if t is not None]
        return max(sizes, default=1)

    def _expanded(self) -> AttentionMask:
        """This pattern with ``prefix_len`` of one entry repeated to the batch of ``key_valid`` (for indexing)."""
        B = self.batch_size()
        if self.prefix_len is None or self.prefix_len.shape[0] == B:
            return self
        return AttentionMask(self.seq_len, True, self.prefix_len.expand(B), self.key_valid)

    def materialize(self) -> torch.Tensor | None:
        """The pattern as a boolean [B or 1, 1, N, N] tensor; None where it is full or plain causal (SDPA's
        ``attn_mask=None`` / ``is_causal=True`` do those exactly and faster)."""
        if not self.masked:
            return None
        idx = torch.arange(self.seq_len, device=self.device)
        b = torch.arange(self.batch_size(), device=self.device)
        return self._expanded().allows(b[:, None, None], idx[None, :, None], idx[None, None, :])[:, None]

    def build_block_mask(self):
        """FlexAttention's block mask of this pattern ([B or 1] x heads broadcast x N x N)."""
        from torch.nn.attention.flex_attention import create_block_mask

        m = self._expanded()

        def mask_mod(b, h, q_idx, kv_idx):
            return m.allows(b, q_idx, kv_idx)

        B, N = self.batch_size(), self.seq_len
        return create_block_mask(mask_mod, B, None, N, N, device=self.device)


_compiled_flex = None  # FlexAttention compiled once per process (it is only fast compiled)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """``flex_attention`` compiled (eager it materializes the scores, like the plain way, and warns)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if torch.compiler.is_compiling():  # inside a compiled block: the enclosing compile fuses it
        return flex(q, k, v, block_mask=block_mask)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def additive_mask(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean mask as float32 0 / -inf, to add to the scores (the add then yields float32 scores directly)."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))


def causal_bias(n: int, device: torch.device) -> torch.Tensor:
    """float32 [n, n]: 0 on and below the diagonal, -inf above."""
    return torch.full((n, n), float("-inf"), device=device).triu(1)


_cached_causal_bias = functools.lru_cache(maxsize=8)(causal_bias)


def causal_additive_mask(n: int, device: torch.device) -> torch.Tensor:
    """:func:`causal_bias`, kept per length in eager (every causal layer adds it). Inside torch.compile it is built
    in the graph instead (once, as a constant): dynamo does not trace through ``lru_cache``."""
    return causal_bias(n, device) if torch.compiler.is_compiling() else _cached_causal_bias(n, device)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias) v`` with the scores materialized (q, k, v [B, H, N, hd]).

    bias: float 0 / -inf broadcastable to [B, H, N, N], or None. The softmax runs in float32 (or wider) and its
    weights are cast back to v's dtype, so in bf16 the two matmuls are bf16 and the normalization is exact."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # [B, H, N, N]
    if bias is not None:
        scores = scores + bias  # float32 bias: float32 scores
    acc = torch.promote_types(scores.dtype, torch.float32)
    return torch.softmax(scores.to(acc), dim=-1).to(v.dtype) @ v  # [B, H, N, hd]


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """Scaled dot-product attention of q, k, v [B, H, N, hd] under ``mask`` -> [B, H, N, hd].

    mask: an :class:`AttentionMask`, a boolean tensor broadcastable to [B, H, N, N] (True = may attend), or None
    (full attention, or causal when ``is_causal``). The backend is :func:`choose_backend`'s.
    """
    pattern = mask if isinstance(mask, AttentionMask) else None
    if pattern is not None:
        is_causal = pattern.is_plain_causal
    masked = pattern.masked if pattern is not None else mask is not None
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    compiled = torch.compiler.is_compiling()
    backend = choose_backend(q.device, q.dtype, q.shape[-2], masked, needs_grad, _forced, compiled)
    if backend == "flex" and pattern is not None and pattern.masked:
        return flex_attention(q, k, v, pattern.block_mask)
    if backend == "matmul":
        if pattern is not None and pattern.masked:
            bias = pattern.additive
        elif mask is not None and not isinstance(mask, AttentionMask):
            bias = additive_mask(mask)
        else:
            bias = causal_additive_mask(q.shape[-2], q.device) if is_causal else None
        return matmul_attention(q, k, v, bias)
    dense = pattern.dense if pattern is not None else mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=is_causal and dense is None)
