"""A frozen encoder run by onnxruntime (``--runtime onnxruntime``): exported once, cached, fp32 or int8.

:func:`onnx_encoder` turns a PyTorch encoder into an :class:`OrtEncoder`: a module whose ``forward(pixels)`` gives
the features the PyTorch encoder gives ([B, N, D] float32, after the final norm) from the same normalized pixels,
so every feature path (extract, probe, classify, the feature cache) takes it in place of the PyTorch one; it holds
an onnxruntime session and no weights. ``int8`` quantizes the exported graph with ``onnxruntime.quantization``
(``aimv2.weights.onnx_quantize``): ``dynamic`` by default, ``static`` with calibration images.

The export cache: ``$AIMV2_ONNX_CACHE``, else ``$AIMV2_CACHE/onnx``, else ``~/.cache/aimv2/onnx``. A graph is
named by a hash of everything that shapes it: the weights' bytes (every state_dict tensor), the encoder's config,
the image size of a learned position embedding (a sin-cos encoder's graph takes any size: native resolution), the
opset, the dtype and int8 recipe, the calibration images (their files and preprocessing), and the torch and
onnxruntime versions that wrote it. A graph is written under a temporary name and renamed into place, so an
interrupted export leaves nothing that a later call would take for finished; the next call with the same
settings loads it without exporting.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..errors import MissingPackageError
from ..models.encoder import VisionEncoder, resize_pos_embed
from ..objectives.lit import LiTTower
from ..weights.onnx_export import export_module, export_onnx, needs_external_data, weights_file
from ..weights.onnx_quantize import quantize_onnx
from .feature_cache import weights_digest

RUNTIMES = ("torch", "onnxruntime")
ORT_DTYPES = ("fp32", "int8")
CACHE_FORMAT = "aimv2-onnx-v1"
# per-tensor weight scales for both recipes: per-channel lost feature cosine in both, measured by
# benchmarks/inference_speed.py (ort-int8-pc, ort-int8-static-pt; benchmarks/results/inference_speed_ort_*):
# a pretrained tiny encoder, dynamic 0.99946 per-tensor vs 0.99849 per-channel, static 0.99951 vs 0.99876; the
# random base encoder on random inputs, static 0.958 vs 0.957
PER_CHANNEL = {"dynamic": False, "static": False}
CALIBRATION_IMAGES = 32  # images of --calibrate DIR that set the activation ranges (MinMax) of static int8


def require_onnxruntime() -> None:
    """The one-line error naming the extra when onnxruntime (or the exporter's onnxscript) is missing."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise MissingPackageError(
            f"--runtime onnxruntime needs onnxruntime, onnx and onnxscript ({e.name} is missing); "
            "pip install 'aimv2[onnx]', or pass --runtime torch"
        ) from None


def check_ort_dtype(dtype: str) -> None:
    """ValueError unless onnxruntime runs ``dtype``."""
    if dtype not in ORT_DTYPES:
        raise ValueError(
            f"--runtime onnxruntime runs --dtype fp32 or int8 (onnxruntime.quantization), not {dtype}; "
            f"for {dtype} use --runtime torch"
        )


def onnx_cache_dir() -> Path:
    if root := os.environ.get("AIMV2_ONNX_CACHE"):
        return Path(root).expanduser()
    root = os.environ.get("AIMV2_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "aimv2") / "onnx"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a container or taskset narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session of the graph at ``path``, its intra-op threads the usable CPUs."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or usable_cpus()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initializers etc. are not the user's business
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def graph_key(parts: dict) -> str:
    """The cache name of a graph: a hash of ``parts`` and of the versions that write and run it."""
    import onnxruntime

    key = {"format": CACHE_FORMAT, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, **parts}
    return hashlib.blake2b(json.dumps(key, sort_keys=True, default=str).encode(), digest_size=20).hexdigest()


def cached_graph(key: str, write: Callable[[Path], object], cache_dir: str | os.PathLike | None = None) -> Path:
    """The graph ``key`` names in the cache; on a miss ``write(path)`` makes it, in a temporary folder beside the
    cache, and it is renamed into place (its ``.data`` weights file first, the graph last)."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else onnx_cache_dir()
    path = root / f"{key}.onnx"
    if path.is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{key}."))
    try:
        write(tmp / path.name)
        if weights_file(tmp / path.name).exists():
            os.replace(weights_file(tmp / path.name), weights_file(path))
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


class OrtModule(nn.Module):
    """An onnxruntime graph with one float input and one float output, as a module: ``forward(x)`` takes a tensor
    (moved to the CPU as float32) and returns a float32 CPU tensor. ``key`` (a persistent buffer, the hash of its
    graph) makes the module's state name the graph, so the feature cache of two graphs never mixes."""

    def __init__(self, path: str | os.PathLike, key: str, dtype: str, input_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.path = Path(path)
        self.dtype = dtype
        self.input_dtype = input_dtype
        self.session = session(path)
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.register_buffer("graph_key", torch.tensor(list(bytes.fromhex(key)), dtype=torch.uint8))

    @property
    def is_int8(self) -> bool:
        return self.dtype == "int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", self.input_dtype).contiguous().numpy()
        (out,) = self.session.run([self.output_name], {self.input_name: x})
        return torch.from_numpy(out)


class OrtEncoder(OrtModule):
    """A vision encoder run by onnxruntime: normalized pixels [B, 3, H, W] -> features [B, N, D] float32, as the
    PyTorch encoder it was exported from; ``cfg`` is that encoder's config (the preprocessing reads it)."""

    def __init__(self, path, key: str, dtype: str, cfg):
        super().__init__(path, key, dtype)
        self.cfg = cfg

    @property
    def patch_size(self) -> int:
        return self.cfg.patch_size

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    def extra_repr(self) -> str:
        return f"{self.path.name}, {self.dtype}"


def at_size(encoder: VisionEncoder, hw: tuple[int, int]) -> VisionEncoder:
    """``encoder`` with a learned position embedding fixed to ``hw`` (resized once, as PyTorch resizes it on the
    fly for other grids), so its graph has that input size; the encoder itself when it already has it."""
    if encoder.cfg.pos_embed == "sincos" or tuple(hw) == tuple(encoder.cfg.image_hw):
        return encoder
    cfg = replace(encoder.cfg, img_size=tuple(hw))
    sd = dict(encoder.state_dict())
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], encoder.cfg.grid_size, cfg.grid_size)
    resized = VisionEncoder(cfg)
    resized.load_state_dict(sd)
    return resized.eval()


def onnx_encoder(
    encoder: VisionEncoder,
    *,
    dtype: str = "fp32",
    img_size: int | tuple[int, int] | None = None,
    calibration: Callable[[], Iterator] | None = None,
    calibration_id: str | None = None,
    per_channel: bool | None = None,
    opset: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> OrtEncoder:
    """The :class:`OrtEncoder` of ``encoder`` (a float32 :class:`VisionEncoder`), from the cache or exported now.

    dtype: ``fp32``, or ``int8``: dynamic quantization, or static when ``calibration`` is given (a function giving
        float32 pixel batches, normalized as the features will be; ``calibration_id`` names them in the cache key).
    img_size: the input size of a learned-position encoder (default its own); a sin-cos encoder's graph takes any
        multiple of the patch size (native resolution).
    per_channel: per-channel weight scales (default :data:`PER_CHANNEL` of the int8 recipe).
    """
    require_onnxruntime()
    check_ort_dtype(dtype)
    if not isinstance(encoder, VisionEncoder):
        raise TypeError(f"onnx_encoder takes a VisionEncoder, got {type(encoder).__name__}")
    if img_size is not None:
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        encoder = at_size(encoder, hw)
    native = encoder.cfg.pos_embed == "sincos"
    fp32 = {
        "graph": "encoder",
        "weights": weights_digest(encoder),
        "config": encoder.cfg.to_dict(),
        "input": "native" if native else list(encoder.cfg.image_hw),
        "opset": opset,
    }
    key = graph_key(fp32)
    path = cached_graph(key, lambda p: export_onnx(encoder, p, opset=opset), cache_dir)
    if dtype == "int8":
        path, key = _int8(path, fp32, encoder, calibration, calibration_id, per_channel, cache_dir)
    return OrtEncoder(path, key, dtype, encoder.cfg)


def _int8(fp32_path, fp32_parts, module, calibration, calibration_id, per_channel, cache_dir, name="pixels"):
    mode = "static" if calibration is not None else "dynamic"
    per_channel = PER_CHANNEL[mode] if per_channel is None else per_channel
    parts = {**fp32_parts, "int8": mode, "per_channel": per_channel, "calibration": calibration_id}
    key = graph_key(parts)

    def write(p):
        batches = (b.float().numpy() for b in calibration()) if calibration is not None else None
        with _quiet_quantizer():
            quantize_onnx(fp32_path, p, mode=mode, per_channel=per_channel, calibration=batches, input_name=name,
                          external_data=needs_external_data(module))  # fmt: skip

    return cached_graph(key, write, cache_dir), key


@contextlib.contextmanager
def _quiet_quantizer():
    """onnxruntime.quantization logs advice on the root logger (pre-processing) that is not the user's concern."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def folder_calibration(
    folder: str | os.PathLike, transform: Callable, mean_std, limit: int = CALIBRATION_IMAGES, batch_size: int = 8
) -> tuple[Callable[[], Iterator[torch.Tensor]], str]:
    """The calibration of static int8 from ``limit`` images under ``folder`` (spread evenly over the files sorted
    by path, so class sub-folders all take part), through
    ``transform`` (PIL -> uint8 [3, H, W]: one size for all) and the normalization ``mean_std``: a function giving
    float32 batches, and an id of the files and preprocessing for the cache key. Unreadable files are skipped."""
    from ..data.sources.folders import ImageFiles, ReadError
    from ..data.transforms import mean_std as resolve_mean_std
    from ..data.transforms import normalize
    from ..errors import DataError

    files = ImageFiles.from_folder(folder, transform)
    n = min(limit, len(files))
    picks = sorted({round(i * (len(files) - 1) / max(n - 1, 1)) for i in range(n)})  # spread over the sorted files
    paths = [files.paths[i] for i in picks]
    ident = json.dumps([paths, [Path(p).stat().st_size for p in paths], repr(transform), resolve_mean_std(mean_std)],
                       default=str)  # fmt: skip

    def batches() -> Iterator[torch.Tensor]:
        images = [img for img, _, _ in (files[i] for i in picks) if not isinstance(img, ReadError)]
        if not images:
            raise DataError(f"none of the first {n} images under {folder} could be read; check --calibrate")
        for i in range(0, len(images), batch_size):
            yield normalize(torch.stack(images[i : i + batch_size]), mean_std, "cpu")

    return batches, hashlib.blake2b(ident.encode(), digest_size=16).hexdigest()


def runtime_encoder(load: Callable[[str], nn.Module], settings) -> nn.Module:
    """The encoder that runs ``settings`` (a :class:`~aimv2.eval.frozen_encoder.FeatureSettings`): ``load(dtype)``
    itself for the torch runtime; for onnxruntime the :class:`OrtEncoder` of ``load("fp32")`` in
    ``settings.dtype``, calibrated on ``settings.calibrate`` (static int8) when that names a folder."""
    from .frozen_encoder import feature_transform

    if settings.runtime == "torch":
        if settings.calibrate:
            raise ValueError("--calibrate sets up onnxruntime's static int8; pass --runtime onnxruntime --dtype int8")
        return load(settings.dtype)
    if settings.runtime != "onnxruntime":
        raise ValueError(f"unknown runtime {settings.runtime!r}: choose {', '.join(RUNTIMES)}")
    check_ort_dtype(settings.dtype)
    require_onnxruntime()  # before any weights are read
    if settings.blocks:
        raise ValueError(
            "--blocks reads inside the encoder, which its ONNX graph does not expose; pass --runtime torch"
        )
    if settings.calibrate and settings.dtype != "int8":
        raise ValueError("--calibrate calibrates int8; add --dtype int8, or leave --calibrate out")
    encoder = load("fp32")
    calibration = calibration_id = None
    if settings.calibrate:
        fixed = replace(settings, native=False)  # one size for every calibration image: the encoder's crop
        calibration, calibration_id = folder_calibration(
            settings.calibrate, feature_transform(encoder, fixed), settings.mean_std
        )
    size = None if settings.native else settings.img_size
    return onnx_encoder(
        encoder, dtype=settings.dtype, img_size=size, calibration=calibration, calibration_id=calibration_id
    )


# ---------------------------------------------------------------------------------------------- LiT: both towers
class OrtLiT(nn.Module):
    """A LiT model's two towers run by onnxruntime: ``encode_image(pixels) -> [B, P]`` and ``encode_text(ids) ->
    [B, P]``, unit-norm embeddings as :class:`~aimv2.objectives.lit.LiT` gives them; ``cfg`` is the model's."""

    def __init__(self, image: OrtModule, text: OrtModule, cfg):
        super().__init__()
        self.image, self.text, self.cfg = image, text, cfg

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image(pixels)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(ids)


def onnx_lit(
    lit,
    *,
    dtype: str = "fp32",
    calibration: Callable[[], Iterator] | None = None,
    calibration_id: str | None = None,
    opset: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> OrtLiT:
    """Both towers of the LiT model ``lit`` as onnxruntime graphs (cached as :func:`onnx_encoder` caches): the
    image tower at the encoder's own size, the text tower at the model's context length, dynamic batch for both.
    ``int8``: both quantized (the image tower static with ``calibration``, the text tower always dynamic)."""
    from torch.export import Dim

    require_onnxruntime()
    check_ort_dtype(dtype)
    lit = lit.eval()
    weights = weights_digest(lit)
    cfg = lit.cfg.encoder
    towers = {}
    for name, example, dims, names in (
        ("image", torch.zeros(2, cfg.in_chans, *cfg.image_hw), {0: Dim("batch", min=1, max=4096)},
         ("pixels", "embeddings")),
        ("text", torch.zeros(2, lit.cfg.text.context_length, dtype=torch.long), {0: Dim("batch", min=1, max=65536)},
         ("ids", "embeddings")),
    ):  # fmt: skip
        module = LiTTower(lit, name)
        parts = {"graph": f"lit-{name}", "weights": weights, "opset": opset}

        def write(p, module=module, example=example, dims=dims, names=names):
            export_module(module, example, dims, p, opset=opset, names=names)

        key = graph_key(parts)
        path = cached_graph(key, write, cache_dir)
        if dtype == "int8":
            cal = calibration if name == "image" else None
            path, key = _int8(path, parts, module, cal, calibration_id if cal else None, None, cache_dir, names[0])
        towers[name] = OrtModule(path, key, dtype, torch.float32 if name == "image" else torch.long)
    return OrtLiT(towers["image"], towers["text"], lit.cfg)
