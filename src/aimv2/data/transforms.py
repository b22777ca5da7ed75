"""Image transforms: PIL image in, **uint8** CHW tensor out; normalization happens later, batched, on the device.

Images cross process boundaries (DataLoader workers -> main process -> GPU) as uint8: a quarter of the bytes of
float32, and the float conversion plus mean/std normalization runs once per batch on the accelerator
(:func:`normalize`) instead of per image on a CPU core.

Evaluation follows Apple's preprocessing: resize the short side to ``img_size`` (bicubic) then center crop.
Pretraining uses RandomResizedCrop (scale 0.4-1, ratio 3/4-4/3, bicubic) and a horizontal flip;
:class:`TrainTransform` does the same from a still-undecoded JPEG, decoding it at 1/2, 1/4 or 1/8 scale when the
crop can be made from the smaller image without upsampling. :func:`native_resize` sizes an image for
native-resolution training (aspect ratio kept, sides multiples of the patch size).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2

# name -> (mean, std) per RGB channel, for pixels scaled to [0, 1]. Apple's training code uses ImageNet's; the
# preprocessor configs published with the checkpoints use CLIP's.
MEAN_STD: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}

_HAS_ALPHA = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    """uint8 [H, W] -> RGB image with three equal channels."""
    return Image.fromarray(values).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB, without the silent errors of ``img.convert("RGB")``.

    - Transparency (RGBA, LA, PA, premultiplied modes, and P/L/RGB images with a ``transparency`` key) is
      composited over white: ``convert("RGB")`` would drop alpha and expose whatever colour hides under it
      (often black), so a logo on a transparent background would turn into a black square.
    - 16-bit greys (``I;16*`` and ``I``, as 16-bit PNG and TIFF decode) are scaled by 255/65535; ``convert`` clips
      them to 255, turning nearly every pixel white.
    - Float images (``F``) in [0, 1] are scaled to [0, 255]; otherwise they are read as [0, 255] and clipped.
    - CMYK, 1-bit, L, P, YCbCr and the rest go through PIL's own conversion, which is exact for them.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in _SIXTEEN_BIT:
        a = np.asarray(img).astype(np.float64)  # [H, W]
        return _gray_to_rgb(np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8))
    if mode == "F":
        a = np.asarray(img).astype(np.float64)  # [H, W]
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.size and a.min() >= 0.0 and a.max() <= 1.0:
            a = a * 255.0
        return _gray_to_rgb(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    if mode in _HAS_ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")  # P/L/RGB with a transparency key become real alpha; RGBa/La are un-premultiplied
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class ToRGB:
    """:func:`to_rgb` as a transform step (a class, so DataLoader workers can pickle it, with a stable repr)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return "ToRGB()"


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name.lower())
    except ValueError:
        valid = ", ".join(m.value for m in InterpolationMode)
        raise ValueError(f"unknown interpolation {name!r}; valid: {valid}") from None


def _hw(img_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


def eval_transform(
    img_size: int | tuple[int, int], crop_pct: float = 1.0, interpolation: str = "bicubic"
) -> v2.Compose:
    """Apple's evaluation preprocessing: short side to ``img_size / crop_pct`` (bicubic), center crop ``img_size``.

    Resizing happens on the PIL image (PIL's bicubic with antialiasing), as in the reference pipeline, so features
    match theirs. Returns a callable PIL image -> uint8 tensor [3, H, W]. Its ``repr`` lists every setting and is
    used as the transform's part of the feature-cache key.
    """
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = _hw(img_size)
    short = int(round(max(h, w) / crop_pct))
    return v2.Compose(
        [
            ToRGB(),
            v2.Resize(short, interpolation=_interpolation(interpolation), antialias=True),
            v2.CenterCrop((h, w)),
            v2.PILToTensor(),  # uint8 [3, H, W]
        ]
    )


def train_transform(
    img_size: int | tuple[int, int],
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    interpolation: str = "bicubic",
) -> v2.Compose:
    """AIMv2 pretraining augmentation: RandomResizedCrop (scale 0.4-1, ratio 3/4-4/3, bicubic) and a flip.

    Returns a callable PIL image -> uint8 tensor [3, H, W].
    """
    steps = [
        ToRGB(),
        v2.RandomResizedCrop(_hw(img_size), scale=scale, ratio=ratio, interpolation=_interpolation(interpolation)),
    ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps.append(v2.PILToTensor())  # uint8 [3, H, W]
    return v2.Compose(steps)


def jpeg_draft_scale(hw: tuple[int, int], min_hw: tuple[int, int]) -> int:
    """The largest JPEG decode reduction (8, 4 or 2) that keeps ``hw`` pixels at least ``min_hw``; else 1."""
    (h, w), (min_h, min_w) = hw, min_hw
    return next((s for s in (8, 4, 2) if h / s >= min_h and w / s >= min_w), 1)


class TrainTransform:
    """:func:`train_transform` for an image that PIL has opened but not decoded yet (``Image.open`` without
    ``load``), decoding JPEGs at reduced scale when that cannot cost quality. PIL image -> uint8 [3, H, W].

    Why: at 224 px output, most of a training step's CPU time goes into decoding the full JPEG. libjpeg can decode
    at 1/2, 1/4 or 1/8 scale for a fraction of the cost (PIL's ``draft``), straight from the DCT coefficients.
    The crop box is drawn first, on the full-size dimensions and with torch's global RNG exactly as torchvision's
    ``RandomResizedCrop`` draws it (so the trainer's per-sample seeding applies, and the boxes are the ones the
    plain pipeline would pick); then the largest scale is used at which the crop still covers at least the output
    size in both dimensions. The final resize is therefore still a downscale (or 1:1) with PIL's antialiased
    bicubic filter, and the result differs from the full decode only by the small difference between libjpeg's
    scaled IDCT and a bicubic downscale. Non-JPEG images, and crops too small to reduce, take the full decode.

    ``accepts_undecoded`` tells :class:`~aimv2.data.sources.shards.ShardSamples` to hand over the lazily opened image,
    so decode errors raised here are counted as bad images there.
    """

    accepts_undecoded = True

    def __init__(
        self,
        img_size: int | tuple[int, int],
        scale: tuple[float, float] = (0.4, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        interpolation: str = "bicubic",
        draft: bool = True,
    ):
        self.size, self.scale, self.ratio, self.hflip = _hw(img_size), tuple(scale), tuple(ratio), hflip
        self.interpolation, self.draft = _interpolation(interpolation), draft
        self._resample = _PIL_RESAMPLE[self.interpolation]
        self._plain = train_transform(self.size, self.scale, self.ratio, hflip, interpolation)

    def __repr__(self) -> str:
        return (
            f"TrainTransform(size={self.size}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, "
            f"interpolation={self.interpolation.value}, draft={self.draft})"
        )

    def draft_scale(self, crop_hw: tuple[int, int]) -> int:
        """The largest JPEG decode reduction (1, 2, 4 or 8) keeping an ``crop_hw`` crop >= the output size; 1 when
        the crop is already smaller than the output (a small image: the resize upsamples at full scale)."""
        return jpeg_draft_scale(crop_hw, self.size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if not self.draft or img.format != "JPEG":
            return self._plain(img)  # the unchanged pipeline; it draws the same random numbers in the same order
        W, H = img.size
        top, left, h, w = v2.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        s = self.draft_scale((h, w))
        if s > 1:
            img.draft("RGB", (W // s, H // s))  # W // (W // s) is in [s, 2s): PIL picks exactly s
            if img.size == (W, H):  # draft refused (e.g. an already decoded image): full scale
                s = 1
        img = to_rgb(img)  # decodes (at 1/s scale); modes handled as everywhere else
        box = (left / s, top / s, (left + w) / s, (top + h) / s)  # the crop, in the decoded image's pixels
        out = img.resize((self.size[1], self.size[0]), self._resample, box=box)  # antialiased, never upsampling
        if self.hflip > 0 and torch.rand(1) < self.hflip:  # as v2.RandomHorizontalFlip draws it
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _chw(out)  # uint8 [3, H, W]


def _chw(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> contiguous uint8 [3, H, W]. numpy does the transposing copy: torch's ``contiguous`` on a
    small permuted uint8 tensor costs ~10x more on a busy multi-threaded CPU."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1)))


_PIL_RESAMPLE = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
}


def native_grid(hw: tuple[int, int], area_patches: int, patch_size: int) -> tuple[int, int]:
    """The patch grid (gh, gw) that :func:`native_resize` gives an image of ``hw = (H, W)`` pixels."""
    H, W = hw
    k = math.sqrt(area_patches * patch_size**2 / (W * H))  # area-matching scale
    gh, gw = max(1, round(H * k / patch_size)), max(1, round(W * k / patch_size))  # sides in patches
    while gh * gw > area_patches:
        if gh >= gw:
            gh -= 1
        else:
            gw -= 1
    return gh, gw


class NativeResize:
    """:func:`native_resize` as a transform (PIL image -> uint8 [3, H, W]): aspect ratio kept, at most
    ``max_patches`` patches. Picklable, with a stable repr (part of feature-cache keys)."""

    def __init__(self, max_patches: int, patch_size: int):
        self.max_patches, self.patch_size = int(max_patches), int(patch_size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return native_resize(img, self.max_patches, self.patch_size)[0]

    def __repr__(self) -> str:
        return f"NativeResize(max_patches={self.max_patches}, patch_size={self.patch_size})"


def native_resize(
    img: Image.Image, area_patches: int, patch_size: int, pad_to: tuple[int, int] | None = None
) -> tuple[torch.Tensor, dict]:
    """Resize for native-resolution training: at most ``area_patches`` patches, aspect ratio kept, sides multiples
    of ``patch_size``. PIL image -> (uint8 [3, H, W], info).

    Each side is rounded to the nearest multiple of the patch size at the scale where the image's area equals
    the budget (at least one patch), then the larger side shrinks by a patch at a time while the budget is
    exceeded: rounding alone could overshoot it by up to a row and a column of patches. Bicubic, antialiased.
    ``pad_to=(H, W)`` pads bottom/right with zeros (for batching different shapes); ``info`` holds
    ``orig_hw``, ``hw`` (the resized content) and ``pad`` ``(bottom, right)``.
    """
    if area_patches < 1 or patch_size < 1:
        raise ValueError(f"need area_patches >= 1 and patch_size >= 1, got {area_patches}, {patch_size}")
    img = to_rgb(img)
    W, H = img.size
    gh, gw = native_grid((H, W), area_patches, patch_size)
    h, w = gh * patch_size, gw * patch_size
    out = _chw(img.resize((w, h), Image.Resampling.BICUBIC))  # uint8 [3, h, w]
    pad = (0, 0)
    if pad_to is not None:
        ph, pw = int(pad_to[0]), int(pad_to[1])
        if ph < h or pw < w:
            raise ValueError(f"pad_to={pad_to} is smaller than the resized image {(h, w)}")
        pad = (ph - h, pw - w)
        out = torch.nn.functional.pad(out, (0, pad[1], 0, pad[0]))  # zeros bottom/right
    info = {"orig_hw": (H, W), "hw": (h, w), "pad": pad}
    return out, info  # uint8 [3, H, W]


class NativeDecode:
    """Decode for native-resolution training from shards: lazily opened PIL image -> RGB PIL image, a JPEG decoded
    at 1/2, 1/4 or 1/8 scale when both sides still cover ``min_side`` pixels.

    Why not a tensor: the reader decodes before the step's grid is drawn, so the image stays a PIL image until the
    batch knows its (H, W) and :func:`native_fit` brings it there. ``min_side`` is the longest side any step can
    ask for (:func:`native_max_side`), so the reduced decode never makes :func:`native_fit` upsample an image that
    was large enough; it only skips work a 4096-pixel photo would otherwise cost at a 16x16-patch step.
    """

    accepts_undecoded = True

    def __init__(self, min_side: int):
        self.min_side = int(min_side)

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.format == "JPEG":
            W, H = img.size
            s = jpeg_draft_scale((H, W), (self.min_side, self.min_side))
            if s > 1:
                img.draft("RGB", (W // s, H // s))  # as in TrainTransform: PIL picks exactly 1/s
        img.load()  # decode now, inside the reader's fault accounting (the reader closes the file after this)
        return to_rgb(img)

    def __repr__(self) -> str:
        return f"NativeDecode(min_side={self.min_side})"


def native_max_side(max_patches: int, max_aspect: float, patch_size: int) -> int:
    """The longest side in pixels of any native step's grid (:func:`aimv2.train.native.fit_grid` keeps
    gh, gw <= round(sqrt(area * aspect)) with area <= max_patches, aspect <= max_aspect)."""
    return (round(math.sqrt(max_patches * max_aspect)) + 1) * patch_size


def native_fit(img: Image.Image, hw: tuple[int, int]) -> torch.Tensor:
    """Bring an image to exactly ``hw = (H, W)`` pixels keeping its aspect ratio: scale it to cover the box
    (bicubic, antialiased), then center-crop the side that overhangs. PIL image -> uint8 [3, H, W].

    Native-resolution training gives all images of a step one grid; an image whose aspect ratio differs from the
    step's loses the overhang rather than being distorted or padded (no padding tokens).
    """
    img = to_rgb(img)
    h, w = int(hw[0]), int(hw[1])
    W, H = img.size
    k = max(h / H, w / W)
    rh, rw = max(h, round(H * k)), max(w, round(W * k))
    top, left = (rh - h) // 2, (rw - w) // 2
    box = (left / k, top / k, (left + w) / k, (top + h) / k)  # the kept region, in the original's pixels
    return _chw(img.resize((w, h), Image.Resampling.BICUBIC, box=box))  # uint8 [3, h, w]


def mean_std(spec: str | tuple) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"imagenet"``, ``"clip"`` or an explicit ``(mean, std)`` pair -> ``(mean, std)``."""
    if isinstance(spec, str):
        if spec not in MEAN_STD:
            raise ValueError(f"unknown mean/std {spec!r}; valid: {', '.join(MEAN_STD)}")
        return MEAN_STD[spec]
    mean, std = spec
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def normalize(
    batch: torch.Tensor,
    mean_std_spec: str | tuple = "imagenet",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 [B, 3, H, W] (on any device) -> ``dtype`` [B, 3, H, W] on ``device``, scaled to [0, 1] and normalized.
    Also patch tokens uint8 [B, N, p*p*3] (per-image native batches), whose values are in (row, col, channel)
    order: the channel is the last of every three.

    The copy to the device moves uint8 (non-blocking when the batch is in pinned memory); the arithmetic runs there.
    """
    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize expects a uint8 batch, got {batch.dtype}")
    tokens = batch.ndim == 3 and batch.shape[-1] % 3 == 0
    if not tokens and (batch.ndim != 4 or batch.shape[1] != 3):
        raise ValueError(f"expected [B, 3, H, W] or patch tokens [B, N, p*p*3], got {tuple(batch.shape)}")
    device = batch.device if device is None else torch.device(device)
    mean, std = mean_std(mean_std_spec)
    x = batch.to(device, non_blocking=True).to(dtype).div_(255.0)  # [B, 3, H, W] (or [B, N, p*p*3]) in [0, 1]
    shape = (1, 1, 1, 3) if tokens else (1, 3, 1, 1)
    m = torch.tensor(mean, device=device, dtype=dtype).view(shape)
    s = torch.tensor(std, device=device, dtype=dtype).view(shape)
    if tokens:
        B, N, P = x.shape
        return x.view(B, N, P // 3, 3).sub_(m).div_(s).view(B, N, P)
    return x.sub_(m).div_(s)
