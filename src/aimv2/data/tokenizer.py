"""Text to fixed-length token ids for the captioning loss, on top of Hugging Face ``tokenizers``; never downloads.

The decoder predicts every caption token and then an end-of-sequence token, so a caption becomes
``[t_1 .. t_n, <eos>, <pad> ...]`` of exactly ``context_length`` ids. Captions longer than the context are cut to
``context_length`` tokens and get **no** ``<eos>``: the model is not taught that a sentence ends where it was
truncated. Padding is ``pad_id`` on the right, which the objective masks out of the loss. Tokenizers whose file
puts a start token before the text (CLIP's ``<|startoftext|>``, which Apple's LiT text tower was trained with)
keep it: ``[<bos>, t_1 .. t_n, <eos>, <pad> ...]``; ours have none.

A run saves its tokenizer as one ``tokenizer.json`` that plain ``tokenizers`` reads too: our settings live in the
file's own fields (the context length and pad id in ``padding``, the eos token in the ``post_processor`` template),
so ``tokenizers.Tokenizer.from_file`` on it encodes a short caption to the same ids we do.

:func:`default_synthetic_tokenizer` is trained in milliseconds on the synthetic captions, so the built-in dataset
needs no tokenizer download; :func:`train_bpe` trains a byte-level BPE on any text for real data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import MissingPackageError
from .synthetic.captions import caption, caption_words
from .synthetic.scenes import sample_scene

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")  # ids 0, 1, 2 in tokenizers we train
DEFAULT_CONTEXT_LENGTH = 77


class UnknownSpecialToken(ValueError):
    """A tokenizer file does not say which token is its pad (or eos, bos) token; ``what`` names which."""

    def __init__(self, what: str):
        super().__init__(f"cannot tell the {what} token of this tokenizer; pass {what}_token=")
        self.what = what


class Tokenizer:
    """Batch encoding to ``LongTensor[B, context_length]`` (see the module docstring) and decoding back."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        *,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        pad_id: int = 0,
        eos_id: int = 1,
        bos_id: int | None = None,
    ):
        if context_length < 1 + (bos_id is not None):
            raise ValueError(f"context_length must leave room for a token, got {context_length}")
        self.context_length, self._pad_id, self._eos_id, self._bos_id = context_length, pad_id, eos_id, bos_id
        # A private copy with padding and truncation off: we pad, truncate and append <eos> ourselves.
        self._tk = HFTokenizer.from_str(tokenizer.to_str())
        self._tk.no_padding()
        self._tk.no_truncation()
        # A caption containing the text "<eos>" must not end early: special tokens are only ever added by us.
        self._tk.encode_special_tokens = True

    # --- properties ---

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def bos_id(self) -> int | None:
        """The start token put before every text, or None (ours: the decoder has its own start embedding)."""
        return self._bos_id

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (no padding, truncation or special tokens added)."""
        return self._tk

    # --- encoding ---

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """``LongTensor[B, context_length]``: ``bos_id`` if any, the tokens of each text, then ``eos_id`` if it fits,
        then ``pad_id``."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("encode takes a string or a list of strings")
        length = self.context_length
        out = np.full((len(texts), length), self._pad_id, dtype=np.int64)
        for row, enc in zip(out, self._tk.encode_batch_fast(list(texts), add_special_tokens=False), strict=True):
            ids = enc.ids if self._bos_id is None else [self._bos_id, *enc.ids]
            if len(ids) < length:
                row[: len(ids)] = ids
                row[len(ids)] = self._eos_id
            else:  # truncated: no <eos>, the caption did not end here
                row[:] = ids[:length]
        return torch.from_numpy(out)

    __call__ = encode

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of one id sequence without its start token, up to (not including) the first eos or pad."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor | np.ndarray) else list(ids)
        if ids and isinstance(ids[0], list):
            raise ValueError("decode takes one sequence; use decode_batch for a batch")
        if ids and self._bos_id is not None and ids[0] == self._bos_id:
            ids = ids[1:]
        for k, t in enumerate(ids):
            if t in (self._eos_id, self._pad_id):
                ids = ids[:k]
                break
        return self._tk.decode(ids, skip_special_tokens=False)

    def decode_batch(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """:meth:`decode` for each row of ``[B, T]`` ids."""
        return [self.decode(row) for row in ids]

    # --- files ---

    def to_str(self) -> str:
        """The ``tokenizer.json`` text: our settings in its padding and post_processor fields."""
        tk = HFTokenizer.from_str(self._tk.to_str())
        pad = self._tk.id_to_token(self._pad_id)
        eos = self._tk.id_to_token(self._eos_id)
        tk.enable_padding(pad_id=self._pad_id, pad_token=pad, length=self.context_length)
        specials, bos = [(eos, self._eos_id)], ""
        if self._bos_id is not None:
            bos = self._tk.id_to_token(self._bos_id) + " "
            specials.append((bos.strip(), self._bos_id))
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos}$A {eos}", pair=f"{bos}$A {eos} $B:1 {eos}:1", special_tokens=specials
        )
        return tk.to_str()

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` to ``path`` (a file path)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_str())

    @classmethod
    def from_str(
        cls,
        text: str,
        *,
        context_length: int | None = None,
        pad_token: str | None = None,
        eos_token: str | None = None,
        bos_token: str | None = None,
        source: str | os.PathLike | None = None,
    ) -> Tokenizer:
        """Read a ``tokenizer.json`` text (``source``: the file it came from, for the error messages). Settings come
        from the file (see :meth:`to_str`); arguments override them,
        and files we did not write fall back to 77 tokens and the tokens named ``<pad>`` and ``<eos>``. The start
        and end tokens are read from a post-processor template ``[<bos>] $A <eos>`` (CLIP's files have one)."""
        try:
            tk = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a plain Exception; its message holds the line and column
            raise ValueError(
                f"not a tokenizer.json: {e} ({source or 'the text given'}); give a file written by "
                "aimv2 tokenizer train, a transformers tokenizer.json or a SentencePiece .model"
            ) from None
        spec = json.loads(text)
        padding = spec.get("padding") or {}
        fixed = (padding.get("strategy") or {}).get("Fixed") if isinstance(padding.get("strategy"), dict) else None
        context_length = context_length or fixed or DEFAULT_CONTEXT_LENGTH

        def token_id(name: str | None, fallback_id: int | None, what: str) -> int:
            if name is not None:
                i = tk.token_to_id(name)
                if i is None:
                    raise ValueError(f"{what} token {name!r} is not in the vocabulary")
                return i
            if fallback_id is not None:
                return fallback_id
            i = tk.token_to_id(f"<{what}>")
            if i is None:
                raise UnknownSpecialToken(what)
            return i

        pad_id = token_id(pad_token, padding.get("pad_id") if padding else None, "pad")
        bos_fallback, eos_fallback = _template_specials(spec.get("post_processor"))
        eos_id = token_id(eos_token, eos_fallback, "eos")
        bos_id = token_id(bos_token, None, "bos") if bos_token is not None else bos_fallback
        return cls(tk, context_length=context_length, pad_id=pad_id, eos_id=eos_id, bos_id=bos_id)

    @classmethod
    def from_sentencepiece(
        cls, path: str | os.PathLike, *, context_length: int = DEFAULT_CONTEXT_LENGTH, lowercase: bool = True
    ) -> Tokenizer:
        """A SentencePiece unigram ``.model`` (e.g. SigLIP's 32k, the paper's) as a ``tokenizers`` Unigram.

        The model's pieces and scores become the Unigram vocabulary, with SentencePiece's NFKC normalization and
        "▁" word boundaries; pad and eos ids come from the model's trainer spec. ``lowercase`` as in the paper.
        Needs the ``sentencepiece`` and ``protobuf`` packages only to read the file.
        """
        try:
            from sentencepiece import sentencepiece_model_pb2
        except ImportError as e:
            raise MissingPackageError("reading a SentencePiece model needs: pip install sentencepiece protobuf") from e
        proto = sentencepiece_model_pb2.ModelProto()
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
        spec = proto.trainer_spec
        if spec.model_type != spec.UNIGRAM:
            raise ValueError(f"{path}: only SentencePiece unigram models are supported (this one is {spec.model_type})")
        vocab = [(p.piece, p.score) for p in proto.pieces]
        tk = HFTokenizer(models.Unigram(vocab, unk_id=spec.unk_id, byte_fallback=spec.byte_fallback))
        norms = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
        norms.append(normalizers.Replace(Regex(" {2,}"), " "))
        tk.normalizer = normalizers.Sequence(norms)
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        pad_id = spec.pad_id if spec.pad_id >= 0 else spec.eos_id  # T5/SigLIP-style models without pad use eos
        if spec.eos_id < 0:
            raise ValueError(f"{path}: the model has no eos token, which the captioning loss needs")
        return cls(tk, context_length=context_length, pad_id=pad_id, eos_id=spec.eos_id)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> Tokenizer:
        """Read a ``tokenizer.json`` file (see :meth:`from_str` for ``overrides``)."""
        with open(path, encoding="utf-8") as f:
            return cls.from_str(f.read(), source=path, **overrides)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, context_length={self.context_length}, pad_id={self.pad_id}, "
            f"eos_id={self.eos_id}{'' if self.bos_id is None else f', bos_id={self.bos_id}'})"
        )


def _template_specials(post: dict | None) -> tuple[int | None, int | None]:
    """(start id, end id) of a TemplateProcessing shaped ``[<bos>] $A <eos>``; None for what it does not have."""
    if not post or post.get("type") != "TemplateProcessing":
        return None, None
    single = post.get("single") or []

    def special_id(item: dict) -> int | None:
        if "SpecialToken" not in item:
            return None
        ids = post.get("special_tokens", {}).get(item["SpecialToken"]["id"], {}).get("ids") or []
        return ids[0] if len(ids) == 1 else None

    at = next((i for i, item in enumerate(single) if "Sequence" in item), None)
    if at is None or at > 1 or at + 2 != len(single):
        return None, None
    return (special_id(single[0]) if at == 1 else None), special_id(single[-1])


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    lowercase: bool = True,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
) -> Tokenizer:
    """A byte-level BPE trained on ``texts``: any string encodes (no unknown tokens) and decodes back exactly
    (after NFC normalization and, with ``lowercase``, lowercasing). Deterministic for the same texts and settings.

    ``special_tokens`` get ids 0, 1, 2, ... in order and must start with the pad and eos tokens.
    ``vocab_size`` is an upper bound: training stops early when no pair of tokens occurs ``min_frequency`` times.
    """
    if len(special_tokens) < 2:
        raise ValueError("special_tokens must name at least the pad and eos tokens")
    unk = special_tokens[2] if len(special_tokens) > 2 else None
    tk = HFTokenizer(models.BPE(unk_token=unk))
    norms = [normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else [])
    tk.normalizer = normalizers.Sequence(norms)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return Tokenizer(tk, context_length=context_length, pad_id=0, eos_id=1)


def synthetic_corpus(n_captions: int = 1000, seed: int = 0) -> list[str]:
    """Captions of random synthetic scenes plus every caption word once, alone and after a space."""
    rng = np.random.default_rng(seed)
    texts = [caption(sample_scene(rng), rng) for _ in range(n_captions)]
    words = caption_words()
    return texts + words + [" ".join(words)]


def default_synthetic_tokenizer(context_length: int = DEFAULT_CONTEXT_LENGTH) -> Tokenizer:
    """The tokenizer for the built-in dataset: a byte-level BPE where every synthetic caption word is one token
    (about 450 ids). Built the same way every time, in well under a second, so a run needs no download."""
    return train_bpe(synthetic_corpus(), vocab_size=4096, context_length=context_length, min_frequency=1)
