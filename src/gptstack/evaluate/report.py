"""Human-readable results: a terminal table, and an HTML or PNG report with plots.

The plots are the training curves of the run that made the checkpoint (its ``metrics.jsonl``,
next to the checkpoint folder) and, for a classifier, the confusion matrix (for a tagger, of entity
types over spans whose boundaries match, "(none)" standing for no entity there). Matplotlib draws them
off-screen (the Agg backend), so a report can be written on a machine with no display.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Callable

from ..train.metrics import read_metrics

HEADLINE = ("loss", "perplexity", "bits_per_byte", "accuracy", "precision_micro", "recall_micro", "f1_micro",
            "precision_macro", "recall_macro", "f1_macro")


def format_table(results: dict) -> str:
    """The results as aligned text lines."""
    lines = [f"task: {results['task']}   checkpoint: {results['checkpoint']}   data: {results['data']}"]
    rows = [(k, results[k]) for k in (*HEADLINE, "tokens", "bytes", "examples", "sentences", "entities",
                                      "predicted_entities") if k in results]
    width = max((len(k) for k, _ in rows), default=0)
    lines += [f"  {k:<{width}}  {v:.4f}" if isinstance(v, float) else f"  {k:<{width}}  {v}" for k, v in rows]
    if "per_class" in results:
        labels = results["labels"]
        name = max(12, *(len(label) + 1 for label in labels))   # entity types run longer than class names
        column = max(10, *(len(label) + 1 for label in labels))
        lines.append(f"  {'class':<{name}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
        for label, m in results["per_class"].items():
            lines.append(f"  {label:<{name}} {m['precision']:>9.4f} {m['recall']:>9.4f} {m['f1']:>9.4f} {m['support']:>8}")
        lines.append("  confusion matrix (rows: true, columns: predicted)")
        lines.append("  " + " " * name + "".join(f"{label:>{column}}" for label in labels))
        for label, row in zip(labels, results["confusion_matrix"]):
            lines.append(f"  {label:<{name}}" + "".join(f"{n:>{column}}" for n in row))
    if "attack" in results:
        attack = results["attack"]
        lines.append(f"  under attack ({attack['kind']}, changing at most {attack['budget']:g} of the words)")
        rows = [(k, v) for k, v in attack.items() if k not in ("kind", "budget")]
        lines += [f"  {k:<{max(len(k) for k, _ in rows)}}  {v:.4f}" for k, v in rows]
    if "rouge" in results:
        lines.append(f"  {'':<8} {'precision':>9} {'recall':>9} {'f1':>9}")
        for name, m in results["rouge"].items():
            lines.append(f"  {name:<8} {m['precision']:>9.4f} {m['recall']:>9.4f} {m['f1']:>9.4f}")
    return "\n".join(lines)


def _plots(results: dict, metrics_path: Path | None) -> list[tuple[str, Callable]]:
    """(title, draw(ax)) for every plot the results support."""
    plots = []
    records = read_metrics(metrics_path) if metrics_path else []
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]

    def loss_curves(ax) -> None:
        if train:
            ax.plot(*zip(*train), label="train loss", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()

    def confusion(ax) -> None:
        matrix, labels = results["confusion_matrix"], results["labels"]
        ax.imshow(matrix, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        top = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, n in enumerate(row):
                ax.text(j, i, str(n), ha="center", va="center", color="white" if n > top / 2 else "black")

    if train or val:
        plots.append(("Loss curves of the training run", loss_curves))
    if "confusion_matrix" in results:
        plots.append(("Confusion matrix", confusion))
    return plots


def write_report(results: dict, path: str | Path, metrics_path: str | Path | None = None) -> Path:
    """An .html report (table, embedded plots, raw JSON) or a .png of the plots side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in (".html", ".png"):
        raise ValueError(f"report {path} must end in .html or .png")
    plots = _plots(results, Path(metrics_path) if metrics_path else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        if not plots:
            raise ValueError("nothing to plot: no training metrics next to the checkpoint and no confusion matrix; "
                             "write an .html report instead")
        fig, axes = plt.subplots(1, len(plots), figsize=(6 * len(plots), 4.5), squeeze=False)
        for ax, (title, draw) in zip(axes[0], plots):
            draw(ax)
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
    parts = [f"<h1>gptstack eval: {html.escape(results['task'])}</h1>",
             f"<pre>{html.escape(format_table(results))}</pre>"]
    for title, draw in plots:
        fig, ax = plt.subplots(figsize=(6.4, 4.5))
        draw(ax)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        parts.append(f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                     f"src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>")
    parts.append(f"<h2>All results (JSON)</h2><pre>{html.escape(json.dumps(results, indent=2))}</pre>")
    path.write_text("<!doctype html><meta charset='utf-8'><title>gptstack eval</title>"
                    "<body style='font-family: sans-serif; max-width: 60em; margin: auto'>"
                    + "\n".join(parts) + "</body>", encoding="utf-8")
    return path
