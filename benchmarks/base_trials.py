"""Trials of the tiny setting's bases: how fast a tiny teacher or student learns the synthetic task.

Each trial builds fresh tiny models (optionally with another rotary base, rotary sections or vision
width), trains one of them with the tiny setting's SFT settings (the learning rate and the end of its
cosine can be changed) on a synthetic data directory (optionally keeping only
some skills, or moving the question before the image), evaluates it on the test split and appends
one JSON line to ``--results``. The README's "Trials with train-only captions" tables came from it:

    vlsi synth --out /tmp/d30k_cap --train 30000 --test 500 --captions
    python benchmarks/base_trials.py --name teacher_cap_1500 --data /tmp/d30k_cap --steps 1500

Two trials side by side on a 2-core machine: give each ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlsi.model.tiny import TinyConfig
from vlsi.model.tiny_models import build_tiny
from vlsi.run.evaluate import EvalConfig, evaluate
from vlsi.run.pipeline import TinySettings, base_sft_config
from vlsi.train.sft import train_sft


def trial_records(data: Path, split: str, skills: set[str], question_first: bool) -> list[dict]:
    records = json.loads((data / f"{split}.json").read_text())
    if skills:
        records = [r for r in records if r["skill"] in skills | {"caption"}]
    for r in records:
        r["image"] = str((data / r["image"]).resolve())
        first = r["conversations"][0]
        if question_first and first["value"].startswith("<image>\n"):
            first["value"] = first["value"].removeprefix("<image>\n") + "\n<image>"
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="trial name; its files go to OUT/NAME")
    p.add_argument("--data", required=True, help="a `vlsi synth` output directory")
    p.add_argument("--out", default="runs/base_trials")
    p.add_argument("--results", default="", help="JSON-lines file to append to (default: OUT/results.jsonl)")
    p.add_argument("--model", choices=["teacher", "student"], default="teacher")
    p.add_argument("--skills", default="", help="comma-separated skills to keep (captions are kept)")
    p.add_argument("--question-first", action="store_true", help="put the image after the first question")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=0.0, help="end of the cosine (default: lr / 100)")
    p.add_argument("--rope-theta", type=float, default=10000.0, help="rotary base of the language model")
    p.add_argument("--vision-dim", type=int, default=64)
    p.add_argument("--mrope", default="", help="time,rows,columns rotary frequencies, e.g. 1,3,12")
    a = p.parse_args()

    root = Path(a.out) / a.name
    root.mkdir(parents=True, exist_ok=True)
    data = Path(a.data)
    skills = set(filter(None, a.skills.split(",")))
    files = {}
    for split in ("train", "test"):
        files[split] = root / f"{split}.json"
        files[split].write_text(json.dumps(trial_records(data, split, skills, a.question_first)))
    models = build_tiny(
        TinyConfig(
            out=str(root / "models"),
            rope_theta=a.rope_theta,
            vision_dim=a.vision_dim,
            mrope_section=a.mrope,
        )
    )
    settings = TinySettings(task="grid", batch_size=a.batch_size, lr=a.lr, min_lr=a.min_lr or a.lr / 100)
    summary = train_sft(base_sft_config(settings, models[a.model], files["train"], root / "sft", a.steps))
    metrics = evaluate(EvalConfig(model=str(root / "sft"), data=str(files["test"]), out=str(root / "eval")))
    row = {
        "name": a.name,
        "args": vars(a),
        "train_seconds": summary["seconds"],
        "accuracy": metrics["accuracy"],
        "per_skill": {k: v["accuracy"] for k, v in metrics["per_skill"].items()},
    }
    print(json.dumps(row))
    with open(a.results or Path(a.out) / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
