"""The tables and the plot of docs/benchmarks.md, read from the recorded JSON files in benchmarks/results/.

`python docs/gen_pages.py` fills the page's `<!-- generated: NAME -->` blocks with :func:`tables`;
`python docs/make_figures.py attention` draws the plot with :func:`attention_plot`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

Load = Callable[[str], dict]


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _machine(m: dict) -> str:
    return f"{m['cpu_model']}, {m['nproc']} cores, {m['date'][:10]}, torch {m['torch']}"


def suite(load: Load) -> str:
    """Every ratio of the `make bench` suite, on each machine it was recorded on."""
    runs = [("suite_cpu/suite.json", "Xeon"), ("suite_cpu_epyc/suite.json", "EPYC")]
    data = [(load(path), name) for path, name in runs]
    lines = [
        "| benchmark | ratio (above 1: ours, or native, better) | "
        + " | ".join(f"{name} (`{path}`)" for path, name in runs)
        + " |",
        "|---|---|" + "---|" * len(runs),
    ]
    first = data[0][0]["benchmarks"]
    for bench, result in first.items():
        for key in result.get("ratios", {}):
            cells = []
            for d, _ in data:
                value = d["benchmarks"].get(bench, {}).get("ratios", {}).get(key)
                cells.append(_x(value) if isinstance(value, int | float) else "")
            lines.append(f"| {bench} | {key} | " + " | ".join(cells) + " |")
    lines.append("")
    for d, name in data:
        lines.append(f"- {name}: {_machine(d['machine'])}; the whole suite {d['total_wall_s'] / 60:.1f} min.")
    return "\n".join(lines)


def encoder(load: Load) -> str:
    d = load("encoder_speed_cpu.json")
    names = {"ours": "aimv2 (ours)", "timm": f"timm `{d['timm_model']}`", "hf": "transformers `Aimv2VisionModel`"}
    lines = ["| images/s (median) | fp32 | bf16 autocast |", "|---|---|---|"]
    for key, label in names.items():
        fp32, bf16 = (d["throughput"][p][key]["median_img_s"] for p in ("fp32", "bf16"))
        lines.append(f"| {label} | {fp32:.3f} | {bf16:.3f} |")
    paired = d["ratios"]
    lines += [
        "",
        f"`{d['model']}`, batch {d['batch_size']}, {d['reps']} rounds, {_machine(d['machine'])} "
        f"(`benchmarks/results/encoder_speed_cpu.json`); paired ratio ours/timm "
        f"{paired['fp32']['ours/timm']['paired']:.3f} fp32, {paired['bf16']['ours/timm']['paired']:.3f} bf16.",
    ]
    return "\n".join(lines)


def l3m(load: Load) -> str:
    files = [
        ("l3m_compare_cpu.json", "eager, each as it runs"),
        ("l3m_compare_cpu_compiled.json", "compiled, each as it runs"),
        ("l3m_compare_cpu_compiled_glibc_defaults.json", "compiled, both with glibc's malloc defaults"),
        ("l3m_compare_cpu_compiled_same_memory.json", "compiled, both keeping freed memory"),
        ("l3m_compare_cpu_compiled_epyc.json", "compiled, each as it runs, on the AVX2 EPYC"),
    ]
    lines = [
        "| ours / l3m step, paired | fp32 | bf16 | of the measured matmul peak, fp32: ours / l3m "
        "| bf16: ours / l3m | file |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in files:
        r = load(name)["results"]
        cells = []
        for p in ("fp32", "bf16"):
            cells.append(_x(r[p]["ours/l3m speed, paired"]) if p in r else "not run")
        peaks = []
        for p in ("fp32", "bf16"):
            peaks.append(
                f"{100 * r[p]['ours fraction of matmul peak']:.0f}% / {100 * r[p]['l3m fraction of matmul peak']:.0f}%"
                if p in r
                else ""
            )
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {peaks[0]} | {peaks[1]} | `{name}` |")
    return "\n".join(lines)


def inference(load: Load) -> str:
    d = load("inference_speed_cpu.json")
    lines = [
        "| variant | img/s | vs fp32 (paired) | feature cosine vs fp32 (mean / min) | probe top-1 "
        "| same prediction as fp32 | weights | forward peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in d["variants"].items():
        lines.append(
            f"| {name} | {v['img_per_s']:.2f} | {_x(v['vs_fp32_paired'])} | {v['cos_mean']:.5f} / {v['cos_min']:.5f} | "
            f"{v['probe_top1']:.1f}% ({v['probe_top1_vs_fp32']:+.1f}) | {v['probe_agree_fp32']:.1f}% | "
            f"{v['weights_mib']:.0f} MiB | {v['forward_peak_mib']:.0f} MiB |"
        )
    lines += ["", f"`{d['encoder']}`, batch {d['batch']}, {d['reps']} paired rounds (`inference_speed_cpu.json`)."]
    return "\n".join(lines)


def tables(load: Load) -> dict[str, str]:
    return {"suite": suite(load), "encoder": encoder(load), "l3m": l3m(load), "inference": inference(load)}


def attention_plot(load: Load, out: Path) -> None:
    """Time of the fused SDPA kernel over the two-matmul attention, per sequence length, dtype and mask, eager and
    compiled (the measurements behind `train.attention: auto`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, (name, title) in zip(
        axes,
        [("attention_crossover_cpu.json", "eager"), ("attention_crossover_cpu_compiled.json", "compiled")],
        strict=True,
    ):
        rows = load(name)["rows"]
        for dtype, pattern in sorted({(r["dtype"], r["pattern"]) for r in rows}):
            pts = sorted(
                (r["seq_len"], r["sdpa/matmul time"]) for r in rows if (r["dtype"], r["pattern"]) == (dtype, pattern)
            )
            ax.plot(
                *zip(*pts, strict=True), marker="o", label=f"{dtype}, {pattern}", ls="-" if dtype == "bf16" else "--"
            )
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(f"{title} ({name})", fontsize=9)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
    axes[0].set_ylabel("SDPA time / two-matmul time\n(above 1: two matmuls faster)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
