"""Training metrics on disk: the full JSON, a flat CSV of the curves, and a PNG of loss and recall."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from voxsearch.common.durable import atomic_write, atomic_write_json

CSV_FIELDS = ("kind", "step", "epoch", "loss", "lr", "grad_norm", "t_prime", "bias", "t2i_R@1", "t2i_R@10",
              "i2t_R@1", "i2t_R@10", "chance_R@1", "chance_R@10", "P@10", "chance_P@10",
              "samples_per_s_per_worker")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_metrics(out: Path, metrics: dict[str, Any]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "metrics.json", "csv": out / "metrics.csv", "png": out / "curves.png"}
    atomic_write_json(paths["json"], _json_safe(metrics))

    def write_csv(fh):
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in metrics.get("history", []):
            writer.writerow({k: row.get(k, "") for k in CSV_FIELDS})

    atomic_write(paths["csv"], write_csv, binary=False)
    plot_curves(metrics.get("history", []), paths["png"])
    return paths


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h for h in history if h.get("kind") == "step"]
    epochs = [h for h in history if h.get("kind") == "epoch" and h.get("t2i_R@1") is not None]
    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([h["step"] for h in steps], [h["loss"] for h in steps], lw=1)
    ax_loss.set(xlabel="optimiser step", ylabel="SigLIP loss", title="training loss")
    ax_loss.grid(alpha=0.3)
    if epochs:
        x = [h["epoch"] for h in epochs]
        n = epochs[-1].get("eval_n")
        for key, style in (("t2i_R@1", "-o"), ("t2i_R@10", "-s"), ("i2t_R@1", "--o"), ("i2t_R@10", "--s"),
                           ("P@10", "-^")):
            if all(h.get(key) is not None for h in epochs):
                ax_rec.plot(x, [h[key] for h in epochs], style, ms=3, label=key)
        for key, colour in (("chance_R@1", "grey"), ("chance_R@10", "black"), ("chance_P@10", "tab:red")):
            if epochs[-1].get(key) is not None:
                ax_rec.axhline(epochs[-1][key], color=colour, ls=":", lw=1, label=key)
        ax_rec.set(xlabel="epoch", ylabel="score", title=f"held-out retrieval (N={n})", ylim=(0, 1.02))
        ax_rec.legend(fontsize=7, ncol=2)
        ax_rec.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)
