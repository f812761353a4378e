"""Are the tiny setting's bases at their plateaus? Each retrained with twice its steps, on its own schedule.

A flat curve at the end of a cosine proves nothing (the learning rate is what went flat), so the test is
the project's rule: a base is at its plateau when a run with ``factor`` x the steps (its own warm-up and
cosine, the same data, stage-0 encoder and seed) gains under one point of validation accuracy at its end.
A base whose validation accuracy is already within one point of 100% passes without a run: no run can
gain a point there.

    python benchmarks/plateau.py --root runs/distill [--bases teacher,student] [--factor 2] [--out DIR]

Writes ``OUT/plateau.json``, ``OUT/plateau.md`` and ``OUT/plateau_curves.png`` (every curve).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from vlsi.run.figures import plot_curves, read_curve
from vlsi.run.pipeline import TinySettings, base_sft_config
from vlsi.train.sft import train_sft


def settings_of(root: Path) -> TinySettings:
    """The tiny settings the bases at ``root`` were trained with (``vlsi distill`` or ``vlsi baselines``)."""
    if (root / "distill_config.yaml").exists():
        distill = yaml.safe_load((root / "distill_config.yaml").read_text())
        return TinySettings(**{**distill["tiny"], "seed": distill["seed"]})
    if (root / "baselines_config.yaml").exists():
        settings = yaml.safe_load((root / "baselines_config.yaml").read_text())
        return TinySettings(**{k: v for k, v in settings.items() if k not in ("out", "student")})
    raise SystemExit(
        f"{root}: neither distill_config.yaml nor baselines_config.yaml; which settings trained it?"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, required=True, help="a finished tiny run (data/, stage0_vision/, *_sft/)"
    )
    parser.add_argument("--bases", default="teacher,student")
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="default: ROOT/plateau")
    args = parser.parse_args(argv)
    cfg, root = settings_of(args.root), args.root
    out = args.out or root / "plateau"
    out.mkdir(parents=True, exist_ok=True)
    data = {
        "teacher": root / "data" / ("pool.json" if cfg.pool else "train.json"),
        "student": root / "data" / "train.json",
    }
    steps = {"teacher": cfg.steps, "student": cfg.student_steps or cfg.steps}
    rows, curves = {}, {}
    for name in [b.strip() for b in args.bases.split(",")]:
        base = read_curve(root / f"{name}_sft" / "curve.jsonl")
        if not base:
            raise SystemExit(f"{root / f'{name}_sft'}: no learning curve (curve.jsonl)")
        curves[f"{name}, {steps[name]} steps"] = base
        final = base[-1]["accuracy"]
        row = {"steps": steps[name], "val_accuracy": final}
        if final >= 0.99:
            row.update(longer=None, gain_points=None, plateau=True, why="within one point of 100%")
        else:
            longer_dir = out / f"{name}_x{args.factor}"
            if not (longer_dir / "export_complete.json").exists():
                train_sft(
                    base_sft_config(
                        cfg, root / "stage0_vision" / name, data[name], longer_dir, steps[name] * args.factor,
                        root / "data" / "val.json",
                    )
                )  # fmt: skip
            longer = read_curve(longer_dir / "curve.jsonl")
            curves[f"{name}, {steps[name] * args.factor} steps"] = longer
            gain = 100 * (longer[-1]["accuracy"] - final)
            row.update(
                longer=longer[-1]["accuracy"], gain_points=gain, plateau=gain < 1.0, why="twice the steps"
            )
        rows[name] = row
    lines = [
        f"| base | steps | validation accuracy | with {args.factor}x the steps | gain (points) | at its plateau |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        longer = "—" if r["longer"] is None else f"{r['longer']:.3f}"
        gain = r["why"] if r["gain_points"] is None else f"{r['gain_points']:+.1f}"
        lines.append(
            f"| {name} | {r['steps']} | {r['val_accuracy']:.3f} | {longer} | {gain} | {'yes' if r['plateau'] else 'no'} |"
        )
    text = "\n".join(lines)
    print(text)
    (out / "plateau.md").write_text(text + "\n")
    (out / "plateau.json").write_text(json.dumps(rows, indent=2))
    plot_curves(curves, out / "plateau_curves.png")
    return 0 if all(r["plateau"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
