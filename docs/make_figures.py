"""Pictures of the documentation, drawn from the code itself.

    python docs/make_figures.py masks        # docs/images/masks.png: the prefix and causal masks
    python docs/make_figures.py attention    # docs/images/attention_crossover.png, from benchmarks/results/

Each picture is computed by the functions it shows, so it cannot disagree with them; rerun after changing them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from aimv2.models.attention import AttentionMask  # noqa: E402
from aimv2.objectives.aimv2 import image_loss_mask  # noqa: E402

IMAGES = Path(__file__).resolve().parent / "images"


def masks(out: Path, num_patches: int = 16, prefix: int = 5, text_len: int = 6) -> None:
    """The encoder's prefix mask, the decoder's causal mask and the outputs that carry a loss."""
    enc = AttentionMask(num_patches, causal=True, prefix_len=torch.tensor([prefix])).materialize()[0, 0]
    n_dec = num_patches + 1 + text_len
    idx = torch.arange(n_dec)
    dec = AttentionMask(n_dec, causal=True).allows(torch.zeros(1, dtype=torch.long), idx[:, None], idx[None, :])
    has_target = image_loss_mask(torch.tensor([prefix]), num_patches)[0]  # output k predicts patch k + 1
    loss = torch.zeros(n_dec, dtype=torch.bool)
    loss[: num_patches - 1] = has_target
    loss[num_patches:-1] = True  # BOS predicts token 0, token t predicts t + 1; the last token predicts nothing

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1, 1.3, 0.28]})
    ax = axes[0]
    ax.imshow(enc.numpy(), cmap="Blues", vmin=0, vmax=1.3)
    ax.set_title(f"encoder: prefix attention\nN = {num_patches} patches, prefix M = {prefix}")
    ax.axhline(prefix - 0.5, color="tab:orange", lw=1.2)
    ax.axvline(prefix - 0.5, color="tab:orange", lw=1.2)
    ax.set_xlabel("key (patch)")
    ax.set_ylabel("query (patch)")
    ax = axes[1]
    ax.imshow(dec.numpy(), cmap="Greens", vmin=0, vmax=1.3)
    ax.set_title(f"decoder: causal attention\n{num_patches} image positions, BOS, {text_len} caption tokens")
    ax.axhline(num_patches - 0.5, color="tab:gray", lw=1.0)
    ax.axvline(num_patches - 0.5, color="tab:gray", lw=1.0)
    labels = [str(i) for i in range(num_patches)] + ["BOS"] + [f"t{i}" for i in range(text_len)]
    ax.set_xticks(range(n_dec), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(n_dec), labels, fontsize=6)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax = axes[2]
    ax.imshow(loss[:, None].numpy(), cmap="Reds", vmin=0, vmax=1.3, aspect="auto")
    ax.set_title("output has\na loss")
    ax.set_xticks([])
    ax.set_yticks(range(n_dec), labels, fontsize=6)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=["masks", "attention"])
    args = parser.parse_args()
    if args.figure == "masks":
        masks(IMAGES / "masks.png")
    if args.figure == "attention":
        import json

        from benchmarks_tables import attention_plot

        results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
        attention_plot(lambda name: json.loads((results / name).read_text()), IMAGES / "attention_crossover.png")
        print(f"wrote {IMAGES / 'attention_crossover.png'}")


if __name__ == "__main__":
    main()
