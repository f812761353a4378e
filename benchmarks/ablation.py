"""The paper's tables at small scale: the built-in tiny setting over several seeds.

For each seed, ``vlsi distill`` runs the built-in setting (bases, VLsI, the SFT and final-layer-KD
controls). Then every ablation variant reruns steps 2 and 3 from that seed's bases and step-1 verbalizers
(linked, not retrained, so variants differ only in what they ablate) and is evaluated on the same test set:

- matching: random, uniform, bottom-1, bottom-3, multinomial, + search range, + order preservation,
  + adaptive temperature (= VLsI);
- operations: intermediate-layer op (kld, ce, l2, none) with last-layer kld, and last-layer op (kld, ce,
  none) with intermediate kld.

Prints mean +- std over the seeds as markdown tables and writes them to ``OUT/ablation.md`` and
``OUT/ablation.json``; ``--readme FILE`` also replaces the block between the ``<!-- ablation:start -->``
and ``<!-- ablation:end -->`` markers there. Finished runs are skipped, so a killed sweep resumes.

    python benchmarks/ablation.py --out runs/ablation --seeds 0,1,2 [--jobs 2] [--readme README.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import yaml

from vlsi.losses.matching import ABLATION_LADDER
from vlsi.run.distill import MODELS, TINY_PRESET

MAIN_ROWS = ["teacher", "student_base", "sft_control", "final_layer_kd", "vlsi"]
# name -> step-2 overrides; "vlsi" itself is the main run's own result.
MATCHING = {
    name: {
        k: v
        for k, v in asdict(cfg).items()
        if k in ("strategy", "search_range", "order_preservation", "adaptive_temperature", "k")
    }
    for name, cfg in ABLATION_LADDER.items()
    if name != "vlsi"
}
OPERATIONS = {
    "il=ce, ll=kld": {"il": "ce"},
    "il=l2, ll=kld": {"il": "l2"},
    "il=kld, ll=ce": {"ll": "ce"},
    "il=kld, ll=none": {"ll": "none"},
}
# Rows of the operation table that other runs already give.
OPERATION_ALIASES = {"il=kld, ll=kld": "vlsi", "il=none, ll=kld": "final_layer_kd"}


def _run(cmd: list[str], log: Path, threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}); see {log}")


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(target.resolve(), target_is_directory=True)


# What --share-bases reuses from the first seed: the data, the stage-0 encoder and both SFT bases.
BASE_STAGES = (
    "data",
    "models",
    "stage0_vision",
    "teacher_sft",
    "student_sft",
    "eval/teacher",
    "eval/student_base",
    "eval_val/teacher",
    "eval_val/student_base",
)


def run_seed(out: Path, seed: int, extra: list[str], threads: int, bases: Path | None = None) -> Path:
    root = out / f"seed{seed}"
    if bases is not None and bases != root:
        # Linked stages carry their markers, so `vlsi distill` skips them and reseeds only steps 1-3.
        for name in BASE_STAGES:
            if (bases / name).exists():
                _link(bases / name, root / name)
    _run(
        [sys.executable, "-m", "vlsi.run.cli", "distill", "--out", str(root), "--seed", str(seed), *extra],
        root / "log.txt",
        threads,
    )
    return root


def run_variant(root: Path, seed: int, name: str, overrides: dict, extra: list[str], threads: int) -> dict:
    """Steps 2 and 3 with ``overrides`` from the seed's bases and verbalizers; returns the VLsI metrics."""
    vdir = root / "variants" / name.replace(" ", "").replace(",", "_").replace("=", "-").replace("+", "_")
    for shared in (
        "step1_teacher_verbalizers",
        "step1_student_verbalizers",
        "eval/teacher",
        "eval/student_base",
        "eval_val/teacher",
        "eval_val/student_base",
    ):
        _link(root / shared, vdir / shared)
    config = {
        "out": str(vdir),
        "teacher": str(root / "teacher_sft"),
        "student": str(root / "student_sft"),
        "train_data": str(root / "data" / "train.json"),
        "test_data": str(root / "data" / "test.json"),
        "val_data": str(root / "data" / "val.json"),
        "score": TINY_PRESET["score"],
        "seed": seed,
        "verbalize": TINY_PRESET["verbalize"],
        "interact": {**TINY_PRESET["interact"], **overrides},
        "sft": TINY_PRESET["sft"],
    }
    path = vdir / "variant.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    _run(
        [sys.executable, "-m", "vlsi.run.cli", "distill", "--config", str(path), *extra],
        vdir / "log.txt",
        threads,
    )
    return json.loads((vdir / "results.json").read_text())["vlsi"]


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def table(title: str, rows: dict[str, list[float]]) -> str:
    lines = [f"| {title} | accuracy (%) |", "| --- | --- |"]
    lines += [f"| {name} | {mean_std(values)} |" for name, values in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = cores / jobs)")
    parser.add_argument("--readme", type=Path, default=None, help="replace the ablation block in this file")
    parser.add_argument(
        "--variants",
        default="",
        help="';'-separated ablation rows to run (default: all; names hold commas); the others are left out",
    )
    parser.add_argument(
        "--share-bases",
        action="store_true",
        help="train data and bases once (first seed); later seeds reseed steps 1-3 and the controls only",
    )
    args, extra = parser.parse_known_args(argv)  # anything else goes to every `vlsi distill`
    seeds = [int(s) for s in args.seeds.split(",")]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    t0 = time.perf_counter()

    with ThreadPoolExecutor(args.jobs) as pool:
        bases = None
        if args.share_bases:
            # Alone on the machine, so with every core.
            bases = run_seed(args.out, seeds[0], extra, os.cpu_count() or threads)
        roots = dict(
            zip(seeds, pool.map(lambda s: run_seed(args.out, s, extra, threads, bases), seeds), strict=True)
        )
        variants = {**MATCHING, **OPERATIONS}
        if args.variants:
            chosen = [v.strip() for v in args.variants.split(";")]
            if unknown := [v for v in chosen if v not in variants]:
                raise SystemExit(f"unknown variants {unknown}; choose from {list(variants)}")
            variants = {v: variants[v] for v in chosen}
        jobs = {
            (name, seed): pool.submit(run_variant, roots[seed], seed, name, overrides, extra, threads)
            for name, overrides in variants.items()
            for seed in seeds
        }
        variant_results = {key: job.result() for key, job in jobs.items()}

    main_results = {s: json.loads((roots[s] / "results.json").read_text()) for s in seeds}

    def acc(key: str) -> list[float]:
        return [main_results[s][key]["accuracy"] for s in seeds]

    def variant(name: str) -> list[float]:
        return [variant_results[name, s]["accuracy"] for s in seeds]

    ran = {name for name, _ in variant_results}

    tables = {
        "main": {MODELS[k]: acc(k) for k in MAIN_ROWS},
        "matching": {
            **{name: variant(name) for name in MATCHING if name in ran},
            "+ adaptive temperature (VLsI)": acc("vlsi"),
        },
        "operations": {
            **{op: acc(alias) for op, alias in OPERATION_ALIASES.items()},
            **{name: variant(name) for name in OPERATIONS if name in ran},
        },
    }
    titles = {"main": "model", "matching": "matching strategy", "operations": "step-2 operations"}
    shared = (
        " (data and bases of the first seed; steps 1-3 and controls reseeded)" if args.share_bases else ""
    )
    header = f"Built-in tiny setting, seeds {args.seeds}{shared}: mean ± std of test accuracy over {len(seeds)} seeds."
    markdown = "\n\n".join([header] + [table(titles[k], rows) for k, rows in tables.items()])
    print(markdown)
    print(f"ablation done in {time.perf_counter() - t0:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablation.md").write_text(markdown + "\n")
    (args.out / "ablation.json").write_text(json.dumps({"seeds": seeds, "tables": tables}, indent=2))
    if args.readme:
        start, end = "<!-- ablation:start -->", "<!-- ablation:end -->"
        text = args.readme.read_text()
        if start not in text or end not in text:
            raise SystemExit(f"{args.readme}: no {start} ... {end} block to replace")
        head, rest = text.split(start, 1)
        args.readme.write_text(head + start + "\n" + markdown + "\n" + end + rest.split(end, 1)[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
