"""Trials of the digits task's bases: how far, and how fast, a tiny model of a given size learns it.

One trial builds fresh tiny models of the given language-model size, trains one of them by SFT on a
`vlsi.data.digits` train file, records its learning curve on the validation split (``curve.jsonl``)
and appends one JSON line (the last curve point and the time) to ``OUT/results.jsonl``. Settings
are chosen on the validation split; the test split is for the final numbers only.

    python -c "from vlsi.data.digits import *; generate(DigitsConfig(out='/tmp/dg', val=200, pool=20000))"
    python benchmarks/digit_trials.py --name t8x128 --data /tmp/dg --train-file pool.json --steps 1500

Two trials side by side on a 2-core machine: give each ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlsi.model.tiny import LMSize, TinyConfig
from vlsi.model.tiny_models import build_tiny
from vlsi.train.sft import SFTConfig, train_sft


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="trial name; its files go to OUT/NAME")
    p.add_argument("--data", required=True, help="a vlsi.data.digits output directory")
    p.add_argument("--train-file", default="train.json")
    p.add_argument("--out", default="runs/digit_trials")
    p.add_argument("--init", default="", help="start from this checkpoint instead of fresh weights")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=0.0, help="end of the cosine (default: lr / 100)")
    p.add_argument("--size", default="128,8,4,2,384", help="hidden,layers,heads,kv_heads,intermediate")
    p.add_argument("--vision-dim", type=int, default=64)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--freeze-vision", action="store_true")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    root = Path(a.out) / a.name
    root.mkdir(parents=True, exist_ok=True)
    data = Path(a.data)
    model = a.init
    if not model:
        h, n, heads, kv, inter = (int(x) for x in a.size.split(","))
        size = LMSize(hidden_size=h, num_layers=n, num_heads=heads, num_kv_heads=kv, intermediate_size=inter)
        built = build_tiny(
            TinyConfig(
                out=str(root / "models"),
                seed=a.seed,
                vision_dim=a.vision_dim,
                vision_depth=a.vision_depth,
                teacher=size,
                student=size,
            )
        )
        model = str(built["teacher"])
    t0 = time.perf_counter()
    cfg = SFTConfig(
        model=model,
        data=str(data / a.train_file),
        out=str(root / "sft"),
        max_steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        min_lr=a.min_lr or a.lr / 100,
        warmup_steps=30,
        weight_decay=0.01,
        seed=a.seed,
        max_length=256,
        group_by_length=False,  # as the tiny setting's bases (vlsi.run.pipeline.base_sft_config)
        freeze_vision=a.freeze_vision,
        eval_data=str(data / "val.json"),
        eval_every=a.eval_every,
        eval_limit=400,
    )
    summary = train_sft(cfg)
    curve = [json.loads(line) for line in (root / "sft" / "curve.jsonl").read_text().splitlines()]
    row = {"name": a.name, **vars(a), "seconds": round(time.perf_counter() - t0), "curve": curve}
    row["final_loss"] = summary["final_loss"]
    with (Path(a.out) / "results.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("name", "seconds", "final_loss")}), curve[-1])


if __name__ == "__main__":
    main()
