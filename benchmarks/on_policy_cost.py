"""The cost of an on-policy step-2 step (the student generates its answers, then both models score them
teacher-forced) relative to the paper's off-policy step (the dataset's answers), on the built-in tiny pair.

    PYTHONPATH=src python benchmarks/on_policy_cost.py --out bench_on_policy.json     # CPU, a few minutes

What runs: the tiny teacher and student (``vlsi tiny``, random weights, untrained verbalizers) and the digits
task (``vlsi digits``). Both are first fine-tuned for ``--sft-steps`` on the digits answers, so that they
answer in their format and end their turn as trained bases do (an untrained student always runs to the token
budget, and one pulled toward an untrained teacher soon does). Step 2 then runs on single-turn records (the test split's, one question each: on a multi-turn record
an off-policy batch labels every answer, an on-policy one only the last).

How it is timed: one ``vlsi interact --lmbda 0.5`` run, so that on- and off-policy steps alternate at random
in one process and share whatever else the machine is doing. Each step's time is the interval between
consecutive optimizer steps (fetching the batch, generating where on-policy, forward, backward, update); the
steps are told apart by ``on_policy.jsonl``. Reported: the median step of each kind and their ratio, the
first step left out (warm-up), for each of ``--repeats`` runs; and the generation seconds over the on-policy
steps' time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))


def _setup(root: Path, args) -> dict:
    from vlsi.data.digits import DigitsConfig, generate
    from vlsi.model.backbone import Backbone
    from vlsi.model.loading import load_model
    from vlsi.model.tiny import TinyConfig
    from vlsi.model.tiny_models import build_tiny
    from vlsi.model.verbalizer import base_model_info, build_verbalizers
    from vlsi.train.sft import SFTConfig, train_sft

    # Step 2 runs on single-turn records (the test split's, one question each): on a multi-turn record an
    # off-policy batch labels every answer, an on-policy one only the last, and the steps would not compare.
    generate(DigitsConfig(out=str(root / "digits"), train=args.records, test=args.records // 3, seed=0))
    models = build_tiny(TinyConfig(out=str(root / "tiny")))
    train = str(root / "digits" / "train.json")
    paths = {"data": root / "digits" / "test.json"}
    for name in ("teacher", "student"):
        paths[name] = root / name
        sft = SFTConfig(
            model=str(models[name]),
            data=train,
            out=str(paths[name]),
            max_steps=args.sft_steps,
            lr=1e-3,
            group_by_length=False,  # the order the documented numbers were measured with
        )
        train_sft(sft)
    for name in ("teacher", "student"):
        backbone = Backbone(load_model(paths[name], dtype=torch.float32))
        layers = list(range(backbone.num_layers - 1))
        paths[f"{name}_verbalizers"] = build_verbalizers(backbone, layers).save(
            root / "verbalizers" / name, base_model_info(backbone)
        )
    return paths


def _timed_interact(paths: dict, out: Path, args) -> tuple[dict, list[float]]:
    """One step-2 run at ``--lmbda``; its summary and the seconds of each step."""
    import time

    import vlsi.train.training as training
    from vlsi.train.interact import InteractConfig, train_interaction

    cfg = InteractConfig(
        teacher=str(paths["teacher"]),
        teacher_verbalizers=str(paths["teacher_verbalizers"]),
        student=str(paths["student"]),
        student_verbalizers=str(paths["student_verbalizers"]),
        data=str(paths["data"]),
        out=str(out),
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-4,
        lmbda=args.lmbda,
        gen_max_new_tokens=args.gen_max_new_tokens,
        group_by_length=False,
        resume=False,
    )
    stamps, original = [], training.optimizer_step

    def stamped(*a, **k):
        result = original(*a, **k)
        stamps.append(time.perf_counter())
        return result

    training.optimizer_step = stamped
    try:
        started = time.perf_counter()
        summary = train_interaction(cfg)
    finally:
        training.optimizer_step = original
    # The first interval also holds the run's setup after `started`; it is the warm-up step, left out below.
    times = [b - a for a, b in zip([started, *stamps], stamps, strict=False)]
    return summary, times


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lmbda", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gen-max-new-tokens", type=int, default=32)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = _setup(root, args)
        for r in range(args.repeats):
            out = root / f"run_{r}"
            summary, times = _timed_interact(paths, out, args)
            rows = [json.loads(line) for line in (out / "on_policy.jsonl").read_text().splitlines()]
            generated = {row["step"] for row in rows}
            on = [t for step, t in enumerate(times, 1) if step > 1 and step in generated]
            off = [t for step, t in enumerate(times, 1) if step > 1 and step not in generated]
            runs.append(
                {
                    "on_policy_steps": len(on),
                    "off_policy_steps": len(off),
                    "on_policy_step_s": round(_median(on), 4),
                    "off_policy_step_s": round(_median(off), 4),
                    "ratio": round(_median(on) / _median(off), 3),
                    "generation_share_of_on_policy_steps": round(
                        summary["on_policy"]["generation_seconds"]
                        / sum(t for step, t in enumerate(times, 1) if step in generated),
                        3,
                    ),
                    "answer_chars_mean": round(
                        sum(len(a) for row in rows for a in row["responses"])
                        / max(1, sum(len(row["responses"]) for row in rows)),
                        2,
                    ),
                    "sample_responses": rows[-1]["responses"][:4],
                }
            )
    result = {"settings": vars(args), "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
