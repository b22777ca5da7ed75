"""A trained probe kept as a classifier: ``aimv2 probe ... --save PROBE`` writes it, ``aimv2 classify`` uses it.

One safetensors file holds the head's tensors (``head.*``: weights and the BatchNorm statistics) and, in its
metadata, everything needed to run it again on new images: the head's kind and shape, the class names, the encoder
it was trained on (the ENCODER the probe was given, with ``--checkpoint``/``--pretrained``/``--set``), and the
feature settings (size, crop, normalization, blocks, pooling, dtype, native resolution). Paths are stored
absolute, so a classifier can be used from another directory; the encoder's weights are referenced, not copied.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.sources.folders import ImageFiles, list_images
from ..weights.errors import CheckpointError
from ..weights.resolve import check_state_dict
from .feature_files import check_blocks
from .features import extract_features, extract_native_features, native_shape_groups
from .frozen_encoder import FeatureSettings, feature_transform, load_frozen_encoder
from .onnx_runtime import runtime_encoder
from .probe import AttentiveProbe, LinearProbe

KIND = "aimv2-classifier"


@dataclass
class EncoderSpec:
    """How to open the encoder a classifier was trained on: ``load_frozen_encoder``'s arguments."""

    spec: str
    checkpoint: str | None = None
    pretrained: bool = False
    overrides: dict | None = None
    seed: int = 0

    def load(self, dtype: str = "fp32") -> nn.Module:
        return load_frozen_encoder(self.spec, checkpoint=self.checkpoint, overrides=self.overrides, seed=self.seed,
                                   pretrained=self.pretrained, dtype=dtype)  # fmt: skip


def _absolute(path: str | None) -> str | None:
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def head_config(head: nn.Module) -> dict:
    """What rebuilds ``head``: its kind and shape."""
    if isinstance(head, AttentiveProbe):
        h = head.head
        return {"method": "attentive", "dim": h.k.in_features, "num_classes": h.linear.out_features,
                "num_heads": h.num_heads, "num_queries": h.cls_token.shape[1],
                "batchnorm": isinstance(head.bn, nn.BatchNorm1d)}  # fmt: skip
    if isinstance(head, LinearProbe):
        return {"method": "linear", "dim": head.linear.in_features, "num_classes": head.linear.out_features,
                "batchnorm": isinstance(head.bn, nn.BatchNorm1d)}  # fmt: skip
    raise ValueError(f"cannot save a {type(head).__name__} head; the attentive and linear probes have one")


def build_head(cfg: dict) -> nn.Module:
    if cfg["method"] == "attentive":
        return AttentiveProbe(cfg["dim"], cfg["num_classes"], cfg["num_heads"], cfg["num_queries"], cfg["batchnorm"])
    return LinearProbe(cfg["dim"], cfg["num_classes"], cfg["batchnorm"])


def save_classifier(
    path: str | os.PathLike, head: nn.Module, classes: list[str], encoder: EncoderSpec, settings: FeatureSettings
) -> Path:
    """Write the classifier file (safetensors; its metadata as described at the top of this module)."""
    cfg = head_config(head)
    if len(classes) != cfg["num_classes"]:
        raise ValueError(f"{len(classes)} class names for a head of {cfg['num_classes']} classes")
    encoder = EncoderSpec(_absolute(encoder.spec), _absolute(encoder.checkpoint), encoder.pretrained,
                          encoder.overrides, encoder.seed)  # fmt: skip
    meta = {
        "kind": KIND,
        "head": json.dumps(cfg),
        "classes": json.dumps(classes),
        "encoder": json.dumps(asdict(encoder)),
        "features": json.dumps(asdict(settings)),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, path, metadata=meta)
    return path


@dataclass
class Classifier:
    """A saved probe with its encoder: :meth:`predict` gives class probabilities of image files."""

    head: nn.Module
    classes: list[str]
    encoder_spec: EncoderSpec
    settings: FeatureSettings
    encoder: nn.Module | None = None  # opened on first use

    @property
    def pool(self) -> str:
        return "none" if isinstance(self.head, AttentiveProbe) else "mean"

    @torch.no_grad()
    def predict(self, paths: list[Path], device: torch.device | str = "cpu", progress: bool | None = None) -> dict:
        """``{"paths": the readable ones, "probs": float [n, C], "errors": [ReadError]}``, features computed as the
        probe computed them."""
        s = self.settings
        self.encoder = self.encoder if self.encoder is not None else runtime_encoder(self.encoder_spec.load, s)
        self.check_encoder(self.encoder)
        dataset = ImageFiles(paths, transform=feature_transform(self.encoder, s))
        kw = dict(batch_size=s.batch_size, num_workers=s.num_workers, device=device, dtype=s.dtype, blocks=s.blocks,
                  pool=self.pool, mean_std=s.mean_std, progress=progress, desc="classify")  # fmt: skip
        self.encoder.to(device)
        if s.native:
            groups = native_shape_groups(dataset.paths, s.max_patches, self.encoder.cfg.patch_size)
            f = extract_native_features(self.encoder, dataset, groups=groups, **kw)
        else:
            f = extract_features(self.encoder, dataset, **kw)
        logits = self.head.eval()(f["features"].float())  # [n, C]
        return {"paths": [paths[i] for i in f["indices"].tolist()], "probs": logits.softmax(-1), "errors": f["errors"]}

    def check_encoder(self, encoder: nn.Module) -> None:
        """CheckpointError unless ``encoder`` gives the features the head was trained on (its width, the blocks the
        probe read): an encoder file replaced since ``aimv2 probe --save`` (another width or depth) is named here,
        before any image is read."""
        width, want = encoder.cfg.embed_dim, head_config(self.head)["dim"]
        where = self.encoder_spec.checkpoint or self.encoder_spec.spec
        if width != want:
            raise CheckpointError(
                f"the encoder gives features [N, {width}], the probe's head takes [N, {want}] ({where}: not the "
                "encoder the probe was trained on); restore that encoder or train the probe again on this one"
            )
        check_blocks(encoder, self.settings.blocks)


def load_classifier(path: str | os.PathLike) -> Classifier:
    """A classifier written by :func:`save_classifier` (ValueError for any other file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such classifier file: {path}")
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for a file that is not one
        raise ValueError(f"{path}: not a safetensors file ({e})") from e
    if meta.get("kind") != KIND:
        raise ValueError(f"{path}: not a saved classifier (write one with aimv2 probe ... --save {path.name})")
    missing = [k for k in ("head", "classes", "encoder", "features") if k not in meta]
    if missing:
        raise ValueError(f"{path}: a classifier file without its {', '.join(missing)} metadata; save the probe again")
    head = build_head(json.loads(meta["head"]))
    sd = {k.removeprefix("head."): v for k, v in load_file(path).items()}
    check_state_dict(sd, head, f"{path} (the probe's head)")
    head.load_state_dict(sd)
    settings = FeatureSettings(**json.loads(meta["features"]))
    return Classifier(head.eval(), json.loads(meta["classes"]), EncoderSpec(**json.loads(meta["encoder"])), settings)


def image_paths(items: list[str]) -> list[Path]:
    """Image files from files and folders (searched recursively, sorted), in the order given."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += list_images(p)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    if not out:
        raise ValueError(f"no images in {', '.join(items)}")
    return out
