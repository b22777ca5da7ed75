"""Captions from a pretraining run: the AIMv2 decoder, used the way it was trained, as a generator.

Pretraining teaches the decoder to predict a caption from the encoder's features; reading those predictions back
is the most direct view of what the encoder learned to see. The pipeline:

    images uint8 [B, 3, H, W] -> normalize -> encoder(prefix)  -> feats [B, N, D_enc]
    decoder.start(feats)       image positions + BOS            -> logits of token 0, cache
    decoder.extend(token, ...) one caption token per step       -> logits of the next token
    greedy (argmax) or beam search, until <eos> or ``max_len`` tokens

Conventions shared by :func:`greedy_decode` and :func:`beam_search`:

- A caption is a list of generated token ids, ``<eos>`` included when the model emitted it (``finished``); one that
  reached ``max_len`` without ``<eos>`` is returned as it stands (``finished`` False).
- Scores are sums of log-probabilities of the generated tokens (``<eos>`` included) under the model's distribution
  with the pad token removed: pad is never a training target, so its logit means nothing and it is never emitted
  (unless pad and eos are the same id, as in SentencePiece models without a pad token).
- Both decoders run with the key/value cache (:meth:`MultimodalDecoder.start` / ``extend``) by default; with
  ``use_cache=False`` each step recomputes the full decoder forward, which the tests use as the reference.

The encoder's prefix at inference (``prefix``): ``"full"`` (bidirectional, as the paper evaluates the encoder),
``"random"`` (a prefix length drawn per image from the training distribution U{1, ..., N-1}) or an integer ``M``.
On the tiny synthetic run (400 steps, 256 held-out scenes) the choice made no measurable difference: caption
cross-entropy 0.8435 full vs 0.8433 random vs 0.8459 causal (M=1), object F1 0.156 / 0.154 / 0.157
(benchmarks/caption_quality.py). ``"full"`` is the default: the paper's inference setting, and deterministic.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.tokenizer import Tokenizer
from ..data.transforms import normalize
from ..models.decoder import DecoderCache, MultimodalDecoder
from ..objectives.aimv2 import AIMv2Pretrainer

PREFIX_MODES = ("full", "random")


# ----------------------------------------------------------------------------------------------- decoding
@dataclass
class Generated:
    """One caption per image, best first for beam search."""

    tokens: list[list[int]]  # per image: generated ids, <eos> included if emitted
    scores: list[float]  # per image: sum of log-probabilities of ``tokens``
    finished: list[bool]  # per image: ended with <eos> (False: cut at max_len)


def _banned(vocab_size: int, pad_id: int | None, eos_id: int) -> list[int]:
    return [pad_id] if pad_id is not None and pad_id != eos_id and 0 <= pad_id < vocab_size else []


def _log_probs(logits: torch.Tensor, banned: list[int]) -> torch.Tensor:
    """[R, V] logits -> log-probabilities over the allowed tokens (banned ones at -inf), float32."""
    logits = logits.float()
    if banned:
        logits = logits.clone()
        logits[:, banned] = float("-inf")
    return F.log_softmax(logits, dim=-1)


def _check_max_len(decoder: MultimodalDecoder, max_len: int | None) -> int:
    """At most ``max_text_len`` tokens fit: the decoder reads BOS + tokens 0..t-1 to predict token t."""
    cap = decoder.cfg.max_text_len
    if max_len is None:
        return cap
    if not 1 <= max_len <= cap:
        raise ValueError(f"max_len must be in [1, {cap}] (the decoder's max_text_len), got {max_len}")
    return max_len


class _NextToken:
    """Next-token logits for rows of generated tokens: from the key/value cache, or by a full forward per step."""

    def __init__(self, decoder: MultimodalDecoder, feats: torch.Tensor, use_cache: bool):
        self.decoder, self.feats, self.use_cache = decoder, feats, use_cache  # feats [R, N, D_enc]
        self.cache: DecoderCache | None = None

    def first(self) -> torch.Tensor:
        """Logits of token 0 (read at BOS): [R, V]."""
        if self.use_cache:
            logits, self.cache = self.decoder.start(self.feats)
            return logits
        return self._full(self.feats.new_zeros(self.feats.shape[0], 0, dtype=torch.long))

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [R, t] generated so far (the last one new since the previous call) -> logits of token t [R, V]."""
        if self.use_cache:
            logits, self.cache = self.decoder.extend(tokens[:, -1:], self.cache)  # [R, 1, V]
            return logits[:, 0]
        return self._full(tokens)

    def select(self, rows: torch.Tensor) -> None:
        """Keep rows ``rows`` [R'] (beam search: the parents of the surviving hypotheses)."""
        self.feats = self.feats[rows]
        if self.cache is not None:
            self.cache = self.cache.select(rows)

    def _full(self, tokens: torch.Tensor) -> torch.Tensor:
        # decoder.forward reads BOS + text[:, :-1]; a dummy last token makes text_logits[:, t] predict token t
        text = F.pad(tokens, (0, 1))  # [R, t + 1]
        _, text_logits = self.decoder(self.feats, text)  # [R, t + 1, V]
        return text_logits[:, -1]


@torch.no_grad()
def greedy_decode(
    decoder: MultimodalDecoder,
    feats: torch.Tensor,
    *,
    eos_id: int,
    pad_id: int | None = None,
    max_len: int | None = None,
    use_cache: bool = True,
) -> Generated:
    """The most likely token at every step, for each image of ``feats`` [B, N, D_enc] (encoder output)."""
    max_len = _check_max_len(decoder, max_len)
    B = feats.shape[0]
    banned = _banned(decoder.cfg.vocab_size, pad_id, eos_id)
    step = _NextToken(decoder, feats, use_cache)
    logits = step.first()  # [B, V]
    tokens = feats.new_zeros(B, 0, dtype=torch.long)  # [B, t]
    scores = torch.zeros(B, device=feats.device)  # float32 (float64 is missing on some accelerators)
    done = torch.zeros(B, dtype=torch.bool, device=feats.device)
    for t in range(max_len):
        logp = _log_probs(logits, banned)  # [B, V]
        nxt = logp.argmax(dim=-1)  # [B]
        scores += torch.where(done, 0.0, logp.gather(1, nxt[:, None])[:, 0])
        nxt = torch.where(done, eos_id, nxt)  # finished rows keep emitting <eos>; cut below
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)  # [B, t + 1]
        done |= nxt == eos_id
        if bool(done.all()) or t == max_len - 1:
            break
        logits = step.next(tokens)
    out, finished = [], []
    for row in tokens.tolist():
        end = row.index(eos_id) + 1 if eos_id in row else len(row)
        out.append(row[:end])
        finished.append(eos_id in row)
    return Generated(out, scores.tolist(), finished)


@torch.no_grad()
def beam_search(
    decoder: MultimodalDecoder,
    feats: torch.Tensor,
    *,
    eos_id: int,
    pad_id: int | None = None,
    beam: int = 4,
    max_len: int | None = None,
    length_penalty: float = 0.0,
    use_cache: bool = True,
) -> Generated:
    """The highest-scoring caption found by a beam of ``beam`` hypotheses per image of ``feats`` [B, N, D_enc].

    A hypothesis is ranked by ``score / length ** length_penalty`` (length counts <eos>); 0 ranks by the plain
    sum of log-probabilities, which favours short captions, and 1 by the mean per token. Each step expands the
    ``beam`` live hypotheses by every token and keeps the ``2 * beam`` best candidates: those ending in <eos> and
    ranked within the first ``beam`` are finished, the best ``beam`` others stay live. Search stops for an image
    once it has ``beam`` finished captions and no live hypothesis can still beat the worst of them. With
    ``beam=1`` and no length penalty this is exactly :func:`greedy_decode`; with a beam as large as the number of
    candidates it is exhaustive.
    """
    if beam < 1:
        raise ValueError(f"beam must be at least 1, got {beam}")
    max_len = _check_max_len(decoder, max_len)
    B, K, V = feats.shape[0], beam, decoder.cfg.vocab_size
    dev = feats.device
    banned = _banned(V, pad_id, eos_id)

    def norm(score: float, length: int) -> float:
        return score / length**length_penalty if length_penalty else score

    step = _NextToken(decoder, feats.repeat_interleave(K, dim=0), use_cache)  # rows b * K + k
    scores = torch.full((B, K), float("-inf"), device=dev)  # [B, K] live hypothesis scores
    scores[:, 0] = 0.0  # the K rows start identical: only one may expand, or the beam fills with copies
    tokens = torch.zeros(B * K, 0, dtype=torch.long, device=dev)  # [B * K, t]
    finished: list[list[tuple[float, float, list[int], bool]]] = [[] for _ in range(B)]  # min-heaps by norm
    done = [False] * B
    logits = step.first()  # [B * K, V]
    for t in range(max_len):  # candidates hold t + 1 tokens
        logp = _log_probs(logits, banned)  # [B * K, V]
        cand = (scores.view(B * K, 1) + logp).view(B, K * V)  # [B, K * V]
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=1)  # [B, C] best first
        parent, tok = top_i // V, top_i % V  # [B, C]
        is_eos = tok == eos_id
        # finished: <eos> candidates within the first K ranks
        for b, r in (is_eos[:, :K] & torch.isfinite(top_s[:, :K])).nonzero().tolist():
            if done[b]:
                continue
            seq = tokens[b * K + parent[b, r]].tolist() + [eos_id]
            _keep(finished[b], (norm(top_s[b, r].item(), t + 1), top_s[b, r].item(), seq, True), K)
        # live: the first K candidates not ending in <eos> (a stable sort keeps their rank order)
        order = torch.sort(is_eos.int(), dim=1, stable=True).indices[:, :K]  # [B, K]
        new_s, new_parent, new_tok = top_s.gather(1, order), parent.gather(1, order), tok.gather(1, order)
        new_s = torch.where(new_tok == eos_id, float("-inf"), new_s)  # fewer than K non-<eos> candidates
        rows = (torch.arange(B, device=dev)[:, None] * K + new_parent).flatten()  # [B * K] parent rows
        tokens = torch.cat([tokens[rows], new_tok.flatten()[:, None]], dim=1)  # [B * K, t + 1]
        scores = new_s
        if t == max_len - 1:  # out of room: live hypotheses compete as they are (unfinished)
            for b in range(B):
                if done[b]:
                    continue
                for k in range(K):
                    s = scores[b, k].item()
                    if s > float("-inf"):
                        _keep(finished[b], (norm(s, t + 1), s, tokens[b * K + k].tolist(), False), K)
            break
        for b in range(B):
            if done[b]:
                continue
            best_live = scores[b].max().item()
            # scores only fall as tokens are added; with a length penalty the best a live hypothesis can still
            # reach is its current score normalized by the longest allowed length
            reach = norm(best_live, max_len) if length_penalty > 0 else best_live
            if best_live == float("-inf") or (len(finished[b]) >= K and reach <= finished[b][0][0]):
                done[b] = True
        if all(done):
            break
        step.select(rows)
        logits = step.next(tokens)
    best = [max(f, key=lambda h: h[0]) for f in finished]
    return Generated([h[2] for h in best], [h[1] for h in best], [h[3] for h in best])


def _keep(heap: list, item: tuple, k: int) -> None:
    """Push ``item`` (normalized score first) onto a min-heap holding the best ``k`` items."""
    if len(heap) < k:
        heapq.heappush(heap, item)
    elif item[0] > heap[0][0]:
        heapq.heapreplace(heap, item)


# ----------------------------------------------------------------------------------------------- captioner
@dataclass
class Caption:
    text: str
    tokens: list[int]  # generated ids, <eos> included when emitted
    score: float  # sum of log-probabilities of ``tokens``
    finished: bool  # ended with <eos>


def parse_prefix(value: str | int) -> str | int:
    """``"full"`` | ``"random"`` | a prefix length ``M`` (patches 0..M-1 bidirectional, the rest causal)."""
    if isinstance(value, int) or str(value).lstrip("-").isdigit():
        m = int(value)
        if m < 0:
            raise ValueError(f"prefix length must be non-negative, got {m}")
        return m
    if value not in PREFIX_MODES:
        raise ValueError(f"prefix must be one of {', '.join(PREFIX_MODES)} or a number of patches, got {value!r}")
    return value


class Captioner:
    """Images in, captions out, for a pretraining model and its tokenizer (``from_run`` reads both from a run)."""

    def __init__(
        self,
        model: AIMv2Pretrainer,
        tokenizer: Tokenizer,
        *,
        mean_std: str = "imagenet",
        prefix: str | int = "full",
        seed: int = 0,
    ):
        self.model, self.tokenizer, self.mean_std = model.eval(), tokenizer, mean_std
        # AIMv2's one decoder, or the caption decoder of a baseline (cap, or AIMv2 with separate decoders)
        decoder = getattr(model, "decoder", None) or getattr(model, "text_decoder", None)
        if decoder is None:
            raise ValueError(f"{type(model).__name__} has no caption decoder (AIMv1 and CLIP models cannot caption)")
        self.decoder: MultimodalDecoder = decoder
        self.prefix = parse_prefix(prefix)
        self._gen = torch.Generator().manual_seed(seed)  # "random" prefixes: reproducible for the same inputs

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str | torch.device = "cpu", **kwargs) -> Captioner:
        from ..weights import load_pretraining_run

        run = load_pretraining_run(run_dir, device=device)
        kwargs.setdefault("mean_std", run.config.data.mean_std)
        return cls(run.model, run.tokenizer, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] -> encoder features [B, N, D_enc] under the chosen prefix."""
        pixels = normalize(images, self.mean_std, self.device)  # [B, 3, H, W] float
        B, _, H, W = pixels.shape
        p = self.model.patch_size
        N = (H // p) * (W // p)
        if self.prefix == "full":
            prefix_len = None
        elif self.prefix == "random":
            prefix_len = torch.randint(1, N, (B,), generator=self._gen).to(self.device)  # [B] ~ U{1, ..., N-1}
        else:
            prefix_len = min(int(self.prefix), N)
        return self.model.encoder(pixels, prefix_len=prefix_len)

    def caption(
        self,
        images: torch.Tensor,
        *,
        beam: int = 1,
        max_len: int | None = None,
        length_penalty: float = 0.0,
        use_cache: bool = True,
    ) -> list[Caption]:
        """Captions of uint8 images [B, 3, H, W]: greedy for ``beam=1``, beam search otherwise."""
        feats = self.encode(images)
        tk, dec = self.tokenizer, self.decoder
        common = dict(eos_id=tk.eos_id, pad_id=tk.pad_id, max_len=max_len, use_cache=use_cache)
        if beam == 1 and not length_penalty:
            out = greedy_decode(dec, feats, **common)
        else:
            out = beam_search(dec, feats, beam=beam, length_penalty=length_penalty, **common)
        return [
            Caption(tk.decode(ids).strip(), ids, score, fin)
            for ids, score, fin in zip(out.tokens, out.scores, out.finished, strict=True)
        ]
