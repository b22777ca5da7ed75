"""``aimv2 extract``: features of every image under a folder, written to a .safetensors or .npy file."""

from __future__ import annotations

from .encoder_args import (
    add_encoder_arguments,
    add_native_arguments,
    encoder_from_args,
    feature_settings,
    plain_warnings,
    resolve_device,
)

DESCRIPTION = """Run a frozen AIMv2 encoder over every image under IMAGES_DIR (recursively, sorted by path) and save
the features.

Each image is converted to RGB (transparency composited over white, 16-bit greys scaled), its short side
resized to --img-size (bicubic) and center cropped, then normalized with --mean-std. Images that cannot be
decoded are skipped and named in a warning; the run goes on.

Output, by the extension of OUT:
  .safetensors  tensor "features" float32, metadata "paths" (JSON list, relative to IMAGES_DIR, one per row)
                plus the settings used
  .npy          the features array; the paths go to a sibling OUT-without-.npy + ".paths.txt", one per line

Feature shape: [n, N, D] patch tokens after the final norm (N = (img_size/patch)^2), or [n, D] with
--pool mean. --blocks averages the normalized outputs of several blocks instead of taking the last one.

--native (encoders with sin-cos position embeddings, e.g. aimv2-large-patch14-native) keeps every image's aspect
ratio instead: each is resized to at most --max-patches patches, both sides multiples of the patch size, and
images of the same grid are batched together. Patch tokens then differ in number per image: the .safetensors
file holds "features" [sum of N_i, D] (the images' tokens one after another), "offsets" long [n + 1] (image i is
rows offsets[i]:offsets[i+1]) and "grids" long [n, 2] (gh, gw, row-major tokens); with --pool mean "features"
is [n, D] and "grids" is written too.

--runtime onnxruntime exports the encoder to ONNX once (cached, see --help of --runtime) and runs it in
onnxruntime on the CPU, fp32 or int8 (dynamic, or static with --calibrate DIR): on CPUs several times faster than
PyTorch (benchmarks/inference_speed.py). --blocks needs --runtime torch.

examples:
  aimv2 extract aimv2-large-patch14-224 --checkpoint model.safetensors photos/ feats.safetensors
  aimv2 extract runs/tiny photos/ feats.npy --pool mean --bf16
  aimv2 extract aimv2-large-patch14-224 --pretrained photos/ feats.safetensors --dtype int8
  aimv2 extract runs/tiny photos/ feats.npy --pool mean --runtime onnxruntime --dtype int8
  aimv2 extract aimv2-large-patch14-224 --checkpoint model.safetensors photos/ f.safetensors --blocks -4,-3,-2,-1
  aimv2 extract aimv2-large-patch14-native --checkpoint native.safetensors photos/ f.safetensors --native
"""


def add_arguments(parser) -> None:
    parser.add_argument("encoder", metavar="ENCODER", help="model name, checkpoint file, HF folder or run folder")
    parser.add_argument("images", metavar="IMAGES_DIR", help="folder of images (searched recursively)")
    parser.add_argument("out", metavar="OUT", help="output file: .safetensors or .npy")
    parser.add_argument(
        "--pool", choices=("none", "mean"), default="none", help="none: keep patch tokens; mean: average them"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_native_arguments(parser)
    add_encoder_arguments(parser)


def run(args) -> int:
    from ..eval.feature_files import check_feature_file, extract_folder, write_features

    settings = feature_settings(args)
    check_feature_file(args.out, settings, args.pool, overwrite=args.overwrite)
    device = resolve_device(args.device, args.runtime)
    encoder = encoder_from_args(args)
    with plain_warnings():
        result = extract_folder(
            encoder,
            args.images,
            settings,
            pool=args.pool,
            device=device,
            progress=False if args.no_progress else None,
        )
    written = write_features(args.out, result, {"encoder": args.encoder, "checkpoint": args.checkpoint})
    shape = "x".join(map(str, result.features.shape))
    skipped = f", {len(result.errors)} unreadable skipped" if result.errors else ""
    print(
        f"extracted {len(result.paths)} images{skipped}: features [{shape}] {result.features.dtype}".replace(
            "torch.", ""
        )
    )
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
