"""A trained VLM run as a transformers ``LlavaForConditionalGeneration`` folder (``aimv2 vlm export --to llava``).

transformers' LLaVA takes an AIMv2 tower as it is: ``LlavaConfig(vision_config=Aimv2VisionConfig(...),
text_config=<the LM's config>, vision_feature_select_strategy="full")`` builds ``Aimv2VisionModel`` + the same
Linear-GELU-Linear projector + the LM, and splices the projected patch tokens where the prompt's ``<image>`` tokens
are (the processor expands one ``<image>`` into ``image_seq_length`` of them). What has to be made to agree:

- the features. Our projector reads ``norm(block k)``: the encoder's final RMSNorm applied to block k's output
  (objectives/vlm.py, ``forward_features``). transformers' LLaVA reads ``hidden_states[vision_feature_layer]``, and
  ``Aimv2VisionModel``'s hidden states are the blocks' outputs *before* the final norm (it records them with
  ``tie_last_hidden_states=False``). The exported tower keeps blocks 0..k only and sets the vision config's
  ``tie_last_hidden_states=true``, which transformers honours per config: ``hidden_states[-1]`` is then the
  normalized output of block k, exactly our feature, and ``vision_feature_layer=-1`` reads it. (The norm cannot be
  folded into the projector: it divides each token by its own RMS.)
- the pixels: the image processor resizes to the run's input size (bicubic, PIL) and normalizes with the run's
  ``data.mean_std``, as ``aimv2 vlm ask`` does.
- the prompt: the tokenizer keeps the LM's chat template; an LM without one gets a Jinja template that renders what
  data/chat.py's plain template renders (derived from ``render`` itself and checked against it on export).
- the ``<image>`` id: it must index the LM's embedding table in LLaVA (ours never embeds it). When the tokenizer
  added it past the table, the exported LM's table grows by zero rows and the generation config suppresses them, so
  greedy answers are unchanged.

Tiled runs (``vlm.tiles`` other than 1x1) do not export: LLaVA-NeXT's any-resolution path adds a learned newline
token per row and unpads the tiles, a different computation from ours (a global view + tiles, concatenated).
Pooled runs (``vlm.pool`` > 1) do not either: LLaVA has no token pooling.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import torch

from ..data.chat import render
from ..data.transforms import MEAN_STD
from .errors import CheckpointError
from .hf_config import hf_vision_config
from .layout import from_ours
from .lm import IMAGE_TOKEN, load_vlm_run
from .lora import merge_lora

_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")

# messages the exported chat template is checked on (against data/chat.py's render)
_CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "<image>\nWhat colour is the star?"}],
    [
        {"role": "user", "content": "<image>\nHow many shapes?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And the background?"},
        {"role": "assistant", "content": "light blue."},
    ],
]


def _jinja_string(s: str) -> str:
    """``s`` as a Jinja string literal (Jinja unescapes Python-style; json.dumps writes only ASCII escapes)."""
    return json.dumps(s)


def chat_template_of_render(tokenizer) -> str:
    """A Jinja chat template that renders what ``data.chat.render(tokenizer, ...)`` renders, derived from ``render``
    itself (a start, per-role text before and after the content, the generation prompt), for string contents.

    Raises CheckpointError when ``render`` is not of that form (checked on a few conversations)."""
    u, a = "\x00USER\x00", "\x00ANSWER\x00"
    head = render(tokenizer, [])
    gen = render(tokenizer, [], add_generation_prompt=True)
    one = render(tokenizer, [{"role": "user", "content": u}])
    two = render(tokenizer, [{"role": "user", "content": u}, {"role": "assistant", "content": a}])
    if not (gen.startswith(head) and one.startswith(head) and two.startswith(one)):
        raise CheckpointError("the prompt format of data/chat.py is not prefix-shaped; cannot write a chat template")
    user_pre, user_post = one[len(head) :].split(u)
    asst_pre, asst_post = two[len(one) :].split(a)
    s = _jinja_string
    template = (
        f"{{{{ {s(head)} }}}}{{% for message in messages %}}"
        f"{{% if message['role'] == 'user' %}}{{{{ {s(user_pre)} + message['content'] + {s(user_post)} }}}}"
        f"{{% else %}}{{{{ {s(asst_pre)} + message['content'] + {s(asst_post)} }}}}{{% endif %}}"
        f"{{% endfor %}}{{% if add_generation_prompt %}}{{{{ {s(gen[len(head) :])} }}}}{{% endif %}}"
    )
    return template


def check_chat_template(exported, original) -> None:
    """The exported tokenizer's chat template renders what our training and ``ask`` render, or CheckpointError."""
    for messages in _CHECK_CONVERSATIONS:
        for gen in (False, True):
            got = exported.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            want = render(original, messages, add_generation_prompt=gen)
            if got != want:
                raise CheckpointError(f"the exported chat template renders {got!r}, the run was trained on {want!r}")


def image_processor_config(size: tuple[int, int], mean_std: str) -> dict:
    """The CLIP image processor's settings: resize to (H, W) bicubic (no crop), rescale, normalize with
    ``mean_std``: the pixels ``aimv2 vlm ask`` feeds the run. transformers loads it with its torchvision backend
    by default, whose bicubic differs from PIL's on images of another size; ``backend="pil"`` gives our pixels
    exactly (an image already at the run's size is not resized by either)."""
    mean, std = MEAN_STD[mean_std]
    return {
        "image_processor_type": "CLIPImageProcessorPil",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": size[0], "width": size[1]},
        "resample": 3,  # PIL.Image.Resampling.BICUBIC, as data/sources/llava.image_tensor resizes
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
    }


def _check_exportable(model, cfg) -> None:
    v = cfg.vlm
    if tuple(v.tiles) != (1, 1):
        raise CheckpointError(
            f"vlm.tiles={list(v.tiles)}: tiled runs do not export to LLaVA (LLaVA-NeXT's tiles are a different "
            "computation: a learned newline per row, unpadding); use `aimv2 vlm ask/eval` for this run"
        )
    if v.pool != 1:
        raise CheckpointError(f"vlm.pool={v.pool}: pooled runs do not export to LLaVA (it has no token pooling)")
    lm_width = model.lm.get_input_embeddings().embedding_dim
    if model.projector[0].out_features != lm_width:
        raise CheckpointError(
            f"vlm.projector_hidden={model.projector[0].out_features}: LLaVA's projector's hidden width is the LM's "
            f"({lm_width}); this run does not export"
        )


def llava_state_dict(model, vision_layers: int) -> dict[str, torch.Tensor]:
    """Our VLM's weights under ``LlavaForConditionalGeneration``'s names (transformers 5)."""
    lm = model.lm
    vision = from_ours(model.encoder.state_dict(), "hf")
    deeper = [k for k in vision if (m := _LAYER.match(k)) and int(m.group(1)) >= vision_layers]
    vision = {k: v for k, v in vision.items() if k not in deeper}  # blocks after the one the projector reads
    sd = {f"model.vision_tower.{k}": v for k, v in vision.items()}
    p = model.projector
    for ours, theirs in ((p[0], "linear_1"), (p[2], "linear_2")):
        sd[f"model.multi_modal_projector.{theirs}.weight"] = ours.weight
        sd[f"model.multi_modal_projector.{theirs}.bias"] = ours.bias
    sd.update({f"model.language_model.{k}": v for k, v in lm.base_model.state_dict().items()})
    sd["lm_head.weight"] = lm.get_output_embeddings().weight.clone()  # its own tensor even when tied
    return sd


def export_llava(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the VLM run folder ``run`` as a LLaVA folder ``out`` (model, processor, tokenizer, chat template,
    generation config) that ``LlavaForConditionalGeneration`` / ``AutoProcessor.from_pretrained`` load as they are."""
    import transformers as tf

    model, tokenizer, cfg = load_vlm_run(run)
    _check_exportable(model, cfg)
    exported_tok = _export_tokenizer(tokenizer)
    check_chat_template(exported_tok, tokenizer)  # before anything is written
    merge_lora(model)  # LoRA runs: the adapters folded into the LM's weights
    out = Path(out)
    enc = model.encoder
    depth = len(enc.blocks)
    block = cfg.vlm.block + depth if cfg.vlm.block < 0 else cfg.vlm.block
    vision = hf_vision_config(enc.cfg)
    for k in ("architectures", "model_type", "dtype"):
        vision.pop(k)
    vision.update(num_hidden_layers=block + 1, tie_last_hidden_states=True)  # hidden_states[-1] = norm(block k)

    lm = model.lm
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = lm.get_input_embeddings().num_embeddings
    extra = list(range(vocab, len(tokenizer)))  # added tokens past the LM's table (the <image> placeholder)
    if extra:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            lm.get_input_embeddings().weight[vocab:] = 0
            lm.get_output_embeddings().weight[vocab:] = 0
    text_config = copy.deepcopy(lm.config)
    text_config._name_or_path = ""  # where the LM was read from: a path of this machine, not of the export
    # LLaVA (transformers 5.23) ties lm_head to `language_model.embed_tokens`, a name GPT-2 and others lack: the
    # export writes the output embedding as its own tensor (the same values) and ties nothing
    text_config.tie_word_embeddings = False
    h, w = model.image_size
    config = tf.LlavaConfig(
        vision_config=tf.Aimv2VisionConfig(**vision),
        text_config=text_config,
        image_token_index=image_id,
        image_seq_length=model.tokens_per_image,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        llava = tf.LlavaForConditionalGeneration(config)
    sd = llava_state_dict(model, block + 1)
    missing, unexpected = llava.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise CheckpointError(
            f"LLaVA's names do not fit this VLM's: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    gen = tf.GenerationConfig.from_model_config(lm.config)
    gen.pad_token_id, gen.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if extra:
        gen.suppress_tokens = extra
    llava.generation_config = gen
    out.mkdir(parents=True, exist_ok=True)
    llava.save_pretrained(out)
    pixels = image_processor_config((h, w), cfg.data.mean_std)
    image_processor = tf.CLIPImageProcessorPil(**{k: v for k, v in pixels.items() if k != "image_processor_type"})
    processor = tf.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=exported_tok,
        patch_size=enc.cfg.patch_size,
        vision_feature_select_strategy="full",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
        chat_template=exported_tok.chat_template,
    )
    processor.save_pretrained(out)
    return out


def _export_tokenizer(tokenizer):
    """A copy of the run's tokenizer (``<image>`` added, pad set) with a chat template for sure."""
    tok = copy.deepcopy(tokenizer)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template_of_render(tokenizer)
    return tok
