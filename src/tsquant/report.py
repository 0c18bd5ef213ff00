"""Markdown report with plots: activation histograms with the quantizer's levels and eps,
per-layer step-2 solver curves, and the accuracy table."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .fileio import load_json  # noqa: E402
from .quantizers.activation import SparseQuantizer  # noqa: E402


@torch.no_grad()
def activation_samples(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pre-activations reaching every sparse quantizer for one batch."""
    found, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, SparseQuantizer):
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, args, name=name: found.__setitem__(name, args[0].detach().flatten())
                )
            )
    try:
        model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return found


def plot_histograms(model, samples: dict[str, torch.Tensor], path: Path) -> None:
    n = len(samples)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (name, values) in zip(axes.flat, samples.items(), strict=False):
        q = model.get_submodule(name)
        ax.hist(values.clamp(-3, 4).numpy(), bins=120, color="#4c72b0", density=True)
        for t in q.thresholds().tolist()[1:]:
            ax.axvline(t, color="gray", lw=0.8, ls=":")
        for level in q.levels().tolist()[1:]:
            ax.axvline(level, color="#dd8452", lw=1.0)
        ax.axvline(q.eps, color="#c44e52", lw=1.5, label=f"eps={q.eps:.2f}")
        zeros = float((values <= q.eps).float().mean())
        ax.set_title(f"{name}\nzeros {100 * zeros:.1f}%", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        "Pre-activations at the quantizers (orange: levels, red: eps, dotted: thresholds)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_solver_curves(layers: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in layers:
        hist = [h for h in row.get("history", []) if "agreement" in h]
        if hist:
            ax.plot(
                [h["iter"] for h in hist],
                [h["agreement"] for h in hist],
                marker=".",
                lw=1,
                label=f"{row['layer']} ({row['agreement']:.3f})",
            )
    ax.set_xlabel("alternation")
    ax.set_ylabel("code agreement (true quantized output)")
    ax.set_title("Step 2 per layer (legend: final agreement after refinement)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=6, ncol=2)
    else:  # e.g. every coded layer was solved in one pass: say so instead of an empty plot
        ax.text(
            0.5,
            0.5,
            "no layer recorded code agreement per alternation",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(rows: list[dict]) -> str:
    fp = next((r["top1"] for r in rows if r["method"] == "fp"), None)
    with_val = any(r.get("val_top1") is not None for r in rows)
    head = "| method | weights | activations | top-1 (%) | vs FP |"
    lines = [head + (" validation top-1 (%) |" if with_val else ""), "|---|---|---|---|---|"]
    lines[1] += "---|" if with_val else ""
    for r in rows:
        delta = f"{r['top1'] - fp:+.2f}" if fp is not None else ""
        line = f"| {r['method']} | {r['w_bits']} | {r['a_bits']} | {r['top1']:.2f} | {delta} |"
        if with_val:
            line += f" {r['val_top1']:.2f} |" if r.get("val_top1") is not None else " |"
        lines.append(line)
    return "\n".join(lines)


def _step2_summary(t) -> str:
    """e.g. "tsq, sequential, variant tsquant, lam 3.0" """
    summary = f"{t.method}, {t.mode}"
    if t.method == "tsq":
        summary += f", variant {t.tsq.variant}, lam {t.tsq.lam}"
    return summary


def write_report(ctx) -> Path:
    out = ctx.stage_dir("report")
    out.mkdir(parents=True, exist_ok=True)
    # the settings the stages were made with, not today's config
    made = next((ctx.as_recorded(s).cfg for s in ("transform", "codes") if ctx.done(s)), ctx.cfg)
    lines = [
        f"# tsquant report: {ctx.cfg.name}",
        "",
        f"Model `{made.model.name}` on {ctx.dataset('test').title or ctx.cfg.data.dataset} "
        f"({len(ctx.dataset('test'))} test images); activations {made.codes.bits}-bit with "
        f"eps={made.codes.eps}, weights {made.transform.weight_bits} "
        f"(step 2: {_step2_summary(made.transform)}).",
        "",
    ]
    results = ctx.stage_dir("eval") / "results.json"
    if results.is_file():
        lines += ["## Accuracy", "", results_table(load_json(results)["rows"]), ""]
    if ctx.done("codes"):
        model = ctx.load("codes", ctx.step1_model()).cpu()
        x, _ = next(iter(ctx.test_loader()))
        plot_histograms(model, activation_samples(model, x[:256]), out / "activations.png")
        lines += ["## Activations (step 1)", "", "![activation histograms](activations.png)", ""]
    if ctx.done("transform"):
        meta = load_json(ctx.stage_dir("transform") / "meta.json")
        plot_solver_curves(meta["layers"], out / "solver.png")
        lines += [
            "## Step 2 per layer",
            "",
            "![solver curves](solver.png)",
            "",
            "| layer | rows x inputs -> channels | agreement before | after | solve (s) |",
            "|---|---|---|---|---|",
        ]
        for r in meta["layers"]:
            if "agreement" not in r:  # a method that needs no data (otwa)
                lines.append(
                    f"| {r['layer']} ({r['kind']}, no data) | - | - | - | {r['solve_s']:.1f} |"
                )
                continue
            before = r["agreement_init"] if r["kind"] == "coded" else r["relative_error_init"]
            after = r["agreement"] if r["kind"] == "coded" else r["relative_error"]
            tag = "" if r["kind"] == "coded" else " (rel. error)"
            lines.append(
                f"| {r['layer']}{tag} | {r['rows']} x {r['inputs']} -> {r['channels']} | "
                f"{before:.4f} | {after:.4f} | {r['solve_s']:.1f} |"
            )
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    print(f"[report] wrote {path}", flush=True)
    return path
