"""The language model of a VLM: any transformers causal LM read from a local folder, a tiny one built for tests and
the laptop demo, and the file a VLM run exports (only the weights it trained).

The LM is I/O (a folder of config, weights and tokenizer), so it is read here and handed to the objective
(objectives/vlm.py), which never touches files. Nothing here downloads: ``from_pretrained`` is given a local folder
and ``local_files_only``.

A VLM run's ``vlm.safetensors`` holds the parameters the run trained (the projector always; the LM in stage 2; the
encoder when it was unfrozen), under the objective's names (``projector.0.weight``, ``lm.model.layers.0...``). The
frozen parts are read again from where the run's config says they came from, so a stage-1 run of an 8B LM does not
write the LM a second time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import load_config
from ..config.vlm import VLMConfig, validate_vlm
from ..data.synthetic.questions import text_words
from ..objectives.vlm import VisionLanguageModel
from .encoders import load_encoder
from .errors import CheckpointError
from .lora import apply_lora

VLM_FILE = "vlm.safetensors"
# the files a tokenizer's vocabulary lives in (tokenizer_config.json alone holds none)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")  # fmt: skip
IMAGE_TOKEN = "<image>"  # the placeholder the image's tokens replace (added to a tokenizer that lacks it)

# The tiny LM's chat template: one line per turn, the answer closed by the end token. A real LM brings its own.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'A: ' + m['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise CheckpointError("the VLM needs transformers: pip install 'transformers==5.23.0'") from e
    return transformers


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """(model, tokenizer) of the causal LM saved in the local folder ``path`` (``save_pretrained`` layout).

    The tokenizer gets the ``<image>`` placeholder as a special token when it lacks one; its id may lie past the
    embedding table (the objective never embeds it: the image's tokens take its place), so the LM is not resized."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is not a transformers model folder (no config.json): give vlm.lm a folder written by "
            "save_pretrained, e.g. one made with `aimv2 vlm tiny-lm OUT`"
        )
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the LM's tokenizer into the "
            "same folder (tokenizer.save_pretrained(folder))"
        )
    tf = _transformers()
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32)
    except Exception as e:  # truncated weights (safetensors' own error type), a config transformers cannot read
        raise CheckpointError(f"the LM in {path} cannot be loaded ({type(e).__name__}: {_first_line(e)})") from e
    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as e:  # e.g. a tokenizer class that needs a package not installed
        raise CheckpointError(f"the tokenizer in {path} cannot be loaded ({_first_line(e)})") from e
    return model, prepare_tokenizer(tokenizer)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def prepare_tokenizer(tokenizer):
    """An LM's tokenizer as a VLM uses it: the ``<image>`` placeholder added as a special token when it lacks one,
    and eos as the pad token when it names none (padding is masked; with neither, data/chat.py pads with 0)."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:  # Llama's tokenizers name no pad
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tiny_lm(
    out: str | os.PathLike, *, width: int = 64, depth: int = 2, heads: int = 2, seed: int = 0, max_positions: int = 512
) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` and a word-level tokenizer with a chat template to ``out``.

    Word-level over the built-in scenes' closed vocabulary (data/synthetic: every word, number and punctuation mark
    a caption, question or answer can hold, lower-cased, plus the chat markup ``q`` ``a`` ``:``), so an answer is
    one token and a three-question conversation some forty: a tiny LM learns to answer in minutes of CPU instead of
    first learning to spell. Other words read as ``<unk>``. Specials: ``<pad>``, ``<s>``, ``</s>``, ``<unk>``,
    ``<image>``. Written with ``save_pretrained`` (tokenizer.json included) so a VLM run reads it back through
    ``AutoTokenizer`` exactly as it would a real LM's."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    tf = _transformers()
    out = Path(out)
    specials = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
    words = sorted(set(text_words()) | {"q", "a", ":"})  # the scene text and the chat template's markup
    vocab = {t: i for i, t in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words and runs of punctuation; spaces and newlines dropped
    core.add_special_tokens(specials)
    core.decoder = decoders.WordPiece(cleanup=True)  # words joined by spaces, none before punctuation
    tokenizer = tf.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN],
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = tf.LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config)
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def trained_state(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The entries of ``state_dict`` (default: the model's) whose parameters train (``requires_grad``)."""
    sd = model.state_dict() if state_dict is None else state_dict
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in sd.items() if k in names}


def save_vlm(model: nn.Module, path: str | os.PathLike, state_dict: dict | None = None, metadata: dict | None = None):
    """Write the trained parameters of a VLM objective to ``path`` (safetensors; tied tensors are copied apart)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in trained_state(model, state_dict).items()}
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


def load_vlm_weights(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Load a ``vlm.safetensors`` into ``model`` (the keys it has; every one must exist there). Returns the keys."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a VLM run writes {VLM_FILE} at its first checkpoint")
    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors' own error type: a truncated or foreign file
        raise CheckpointError(f"{path} cannot be read ({_first_line(e)}): truncated or not a {VLM_FILE}?") from e
    own = model.state_dict()
    missing = [k for k in sd if k not in own]
    if missing:
        raise CheckpointError(f"{path} has weights this VLM lacks ({missing[:3]} ...): built with another LM?")
    wrong = [f"{k}: file {list(sd[k].shape)} vs model {list(own[k].shape)}" for k in sd if sd[k].shape != own[k].shape]
    if wrong:
        raise CheckpointError(
            f"{path} does not fit this VLM ({len(wrong)} shape mismatch(es), first {wrong[0]}): the encoder or LM "
            "its config names changed since the run (vlm.encoder, vlm.lm); give the ones it trained with"
        )
    model.load_state_dict(sd, strict=False)
    return list(sd)


def build_vlm(cfg: VLMConfig, encoder: nn.Module, lm: nn.Module, tokenizer) -> VisionLanguageModel:
    """The VLM objective that ``cfg.vlm`` describes, around an encoder and an LM already read."""
    v = cfg.vlm
    model = VisionLanguageModel(
        encoder,
        lm,
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        stage=v.stage,
        train_encoder=v.train_encoder,
        block=v.block,
        tiles=tuple(v.tiles),
        pool=v.pool,
        projector_hidden=v.projector_hidden,
    )
    if v.lora.rank:  # stage 2 with adapters: the LM's weights freeze, rank-r updates train (weights/lora.py)
        apply_lora(model, v.lora.rank, v.lora.alpha, v.lora.dropout, v.lora.target_modules)
    return model


def load_vlm_run(path: str | os.PathLike) -> tuple[VisionLanguageModel, object, VLMConfig]:
    """(model in eval mode, tokenizer, config) of a VLM run folder: its config's encoder and LM, then the weights
    the run trained (``vlm.safetensors``) on top."""
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"{path} is not a VLM run folder (no config.yaml): give the out_dir of `aimv2 vlm train`")
    import yaml

    raw = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if not isinstance(raw, dict) or "vlm" not in raw:
        what = "a pretraining run" if isinstance(raw, dict) and "model" in raw else "not a VLM run"
        raise CheckpointError(
            f"{path} is {what} folder, not a VLM run (its config.yaml has no vlm section): give the out_dir of "
            "`aimv2 vlm train`"
        )
    cfg = load_config(path / "config.yaml", cls=VLMConfig)
    validate_vlm(cfg)
    encoder = load_encoder(cfg.vlm.encoder, **cfg.vlm.encoder_overrides)
    lm, tokenizer = load_causal_lm(cfg.vlm.lm)
    model = build_vlm(cfg, encoder, lm, tokenizer)
    load_vlm_weights(model, path / VLM_FILE)
    return model.eval(), tokenizer, cfg
