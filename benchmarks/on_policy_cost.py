"""The cost of an on-policy step 2 step (``--lmbda 1``: the student generates, then both models score its
answer teacher-forced) relative to the paper's off-policy step (``--lmbda 0``), on the built-in tiny pair.

    PYTHONPATH=src python benchmarks/on_policy_cost.py --out bench_on_policy.json     # CPU, a few minutes

What runs: the tiny teacher and student (``vlsi tiny``, random weights, untrained verbalizers), the digits task
(``vlsi digits``), step 2 on single-turn records. The student is first fine-tuned for ``--sft-steps`` on the
digits answers so that it answers
in their format and ends its turn, as a step-2 student (a trained base) does; an untrained one would always run
to the token budget. Then ``vlsi interact`` at P = 0 and P = 1, the same seed, steps and batches, alternated
``--repeats`` times (the machine may be shared; the fastest of each is reported). A step's time is the run's
training seconds (``train_summary.json``: data, generation, forward, backward, update; not loading) over
its steps, after one unmeasured warm-up run of each. The generation share is the on-policy run's own
measurement (``on_policy.generation_share``). Response lengths are the trained tokens per record less the
prompts', which both runs share.
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
    student = root / "student"
    train = str(root / "digits" / "train.json")
    sft = SFTConfig(
        model=str(models["student"]), data=train, out=str(student), max_steps=args.sft_steps, lr=1e-3
    )
    train_sft(sft)
    paths = {"teacher": models["teacher"], "student": student, "data": root / "digits" / "test.json"}
    for name in ("teacher", "student"):
        backbone = Backbone(load_model(paths[name], dtype=torch.float32))
        layers = list(range(backbone.num_layers - 1))
        paths[f"{name}_verbalizers"] = build_verbalizers(backbone, layers).save(
            root / "verbalizers" / name, base_model_info(backbone)
        )
    return paths


def _interact(paths: dict, out: Path, lmbda: float, args) -> dict:
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
        lmbda=lmbda,
        gen_max_new_tokens=args.gen_max_new_tokens,
        resume=False,
    )
    return train_interaction(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gen-max-new-tokens", type=int, default=32)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = _setup(root, args)
        for lmbda in (0.0, 1.0):  # warm-up
            _interact(paths, root / f"warm_{lmbda}", lmbda, argparse.Namespace(**{**vars(args), "steps": 2}))
        runs = {0.0: [], 1.0: []}
        for r in range(args.repeats):
            for lmbda in (0.0, 1.0):
                runs[lmbda].append(_interact(paths, root / f"run_{lmbda}_{r}", lmbda, args))
        on_policy = root / f"run_1.0_{args.repeats - 1}" / "on_policy.jsonl"
        sample = [json.loads(line)["responses"][:3] for line in on_policy.read_text().splitlines()[-1:]]
    off = min(s["seconds"] for s in runs[0.0]) / args.steps
    on = min(s["seconds"] for s in runs[1.0]) / args.steps
    records = args.steps * args.batch_size
    result = {
        "settings": vars(args),
        "off_policy_step_s": round(off, 4),
        "on_policy_step_s": round(on, 4),
        "ratio": round(on / off, 3),
        "generation_share": [s["on_policy"]["generation_share"] for s in runs[1.0]],
        "tokens_per_record": {
            "off_policy": runs[0.0][0]["tokens_seen"] / records,
            "on_policy": runs[1.0][0]["tokens_seen"] / records,
        },
        "step_seconds_each": {
            str(k): [round(s["seconds"] / args.steps, 4) for s in v] for k, v in runs.items()
        },
        "sample_responses": sample,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
