"""The tiny setting's report figures: accuracy per skill, and the bases' learning curves."""

from __future__ import annotations

import json
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_skills(results: dict, path: str | Path) -> Path:
    """Grouped bars: each model's test accuracy per skill (keyed as in results.json), chance dotted."""
    plt = _pyplot()
    skills = sorted({s for m in results.values() for s in m.get("per_skill", {})})
    names = list(results)
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(2.4 + 1.4 * len(skills), 4.2))
    for i, name in enumerate(names):
        per = results[name].get("per_skill", {})
        xs = [k + i * width for k in range(len(skills))]
        ax.bar(xs, [per.get(s, {}).get("accuracy", 0.0) for s in skills], width, label=name)
    for k, skill in enumerate(skills):
        chance = next(
            m["per_skill"][skill]["chance"] for m in results.values() if skill in m.get("per_skill", {})
        )
        ax.hlines(chance, k - width / 2, k + 0.8 - width / 2, colors="black", linestyles="dotted")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(skills))], skills)
    ax.set_ylabel("test accuracy (dotted: chance)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def read_curve(path: str | Path) -> list[dict]:
    path = Path(path)
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def plot_curves(curves: dict[str, list[dict]], path: str | Path) -> Path:
    """Validation accuracy against optimizer steps, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, points in curves.items():
        if points:
            ax.plot([p["step"] for p in points], [p["accuracy"] for p in points], marker="o", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
