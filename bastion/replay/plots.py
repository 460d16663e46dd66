"""The report's PNGs (matplotlib, optional): ROC curves and per-stage score histograms."""
from __future__ import annotations

import pathlib
import re

import numpy as np

from bastion.replay.metrics import Scored


def _safe_name(stage: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", stage)


def write_plots(out: pathlib.Path, arrays: dict[str, Scored], thresholds: dict[str, float],
                report: dict) -> dict:
    """roc.png (every stage with both classes, and overall) and hist-<stage>.png per stage."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    plots: dict = {"roc": None, "histograms": {}}
    curves = [(name, data) for name, data in arrays.items()
              if data.labels.any() and (~data.labels).any()]
    if curves:
        fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=110)
        for name, data in curves:
            fpr, tpr, _ = roc_curve(data.labels, data.scores)
            value = (report["overall"] if name == "overall" else report["stages"][name])["auroc"]
            style = {"linestyle": "--", "color": "black"} if name == "overall" else {}
            ax.plot(fpr, tpr, drawstyle="default", linewidth=1.8,
                    label=f"{name} (AUROC {value:.3f})", **style)
            threshold = thresholds.get(name)
            if threshold is not None:
                entry = report["stages"][name]
                if entry["fpr"] is not None and entry["tpr"] is not None:
                    ax.plot([entry["fpr"]], [entry["tpr"]], marker="o", markersize=6,
                            color=ax.lines[-1].get_color())
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_xlabel("false positive rate (benign flagged)")
        ax.set_ylabel("true positive rate (attacks detected)")
        ax.set_title("ROC per stage (dot: configured threshold)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "roc.png")
        plt.close(fig)
        plots["roc"] = "roc.png"

    for name, data in arrays.items():
        if name == "overall" or data.scores.size == 0:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        low, high = float(data.scores.min()), float(data.scores.max())
        threshold = thresholds.get(name)
        if threshold is not None:
            low, high = min(low, threshold), max(high, threshold)
        if high - low < 1e-9:
            low, high = low - 0.5, high + 0.5
        pad = (high - low) * 0.04  # keep a threshold at the edge visible
        low, high = low - pad, high + pad
        bins = np.linspace(low, high, min(40, max(10, int(np.unique(data.scores).size) * 2)) + 1)
        for label, values, color in (("benign", data.benign, "tab:blue"),
                                     ("attack", data.attack, "tab:red")):
            if values.size:
                ax.hist(values, bins=bins, alpha=0.55, color=color,
                        label=f"{label} (n={values.size})", edgecolor="white", linewidth=0.4)
        if threshold is not None:
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2,
                       label=f"threshold {threshold:g}")
        ax.set_xlabel(f"bastion.score.{name}")
        ax.set_ylabel("records")
        ax.set_title(f"{name}: scores, benign vs attack")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        filename = f"hist-{_safe_name(name)}.png"
        fig.savefig(out / filename)
        plt.close(fig)
        plots["histograms"][name] = filename
    return plots
