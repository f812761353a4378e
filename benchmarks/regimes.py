"""Where layer-wise distillation helps: VLsI and final-layer KD against the SFT control, regime by regime.

The bases are trained once (the built-in tiny setting's, at their plateaus); each regime is a different
distillation set for the same teacher and student, and each seed reruns steps 1-3 and both controls on
it (``vlsi distill --config`` with ``controls: true``) with the tiny preset's budgets:

- ``own``: the student's own images, exact answers (the built-in default);
- ``new``: 4,800 images new to the student, exact answers;
- ``noise10`` / ``noise30`` / ``noise50``: the same images, that fraction of answers wrong;
- ``free``: the same images, answers in one of several phrasings ("They add up to 20.");
- ``working``: the same images, answers with their working ("4 + 7 + 9 = 20");
- ``teacher``: the same images without answers: every step trains on the teacher base's greedy
  answers (sequence-level KD's data; step 2 itself needs no labels);
- ``own_teacher``: the student's own images with the teacher's answers (sequence-level KD on the default set).

Variants train on a regime's set and change one thing: ``noise30_t3`` (step 3 on the teacher's answers),
``own_p05`` / ``own_p1`` / ``noise30_p05`` / ``noise30_p1`` (on-policy step 2, ``interact --lmbda``; the KD
control becomes GKD), and ``own:<row>``, the paper's ablation rows on the default set (step 2's layer
matching, its intermediate-layer operation ``il`` and last-layer operation ``ll``).

Every model is scored on the last number it writes (``score: number``), on the validation split (for
choosing) and the test split (for reporting). Prints, and writes to ``OUT/regimes.md`` / ``.json`` /
``.png``, VLsI - SFT and KD - SFT per regime as mean ± standard error over the seeds (three tables:
regimes, on-policy, ablation). Finished runs are skipped, so a killed sweep resumes. Every run has one
torch thread (``--threads``): sums in another order train a slightly different model.

    python benchmarks/regimes.py --out runs/regimes [--bases runs/distill] [--seeds 0,1,2,3,4] [--jobs 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import yaml

from vlsi.data.digits import DigitsConfig, generate
from vlsi.losses.matching import ABLATION_LADDER
from vlsi.run.distill import TINY_PRESET
from vlsi.run.evaluate import EvalConfig, evaluate
from vlsi.run.figures import _pyplot
from vlsi.run.relabel import relabel

NEW_IMAGES = 4800  # one epoch of the preset's 150 steps x 32
# The paper's ablation rows (its Tables 5-6): step 2's overrides. Random and uniform matching are left out.
ABLATION = {
    **{
        name: {
            k: getattr(cfg, k)
            for k in ("strategy", "search_range", "order_preservation", "adaptive_temperature", "k")
        }
        for name, cfg in ABLATION_LADDER.items()
        if name not in ("random", "uniform", "vlsi")
    },
    "il=ce": {"il": "ce"},
    "il=l2": {"il": "l2"},
    "ll=ce": {"ll": "ce"},
    "ll=none": {"ll": "none"},
}
STEP1 = ("step1_teacher_verbalizers", "step1_student_verbalizers")
# regime -> the distillation set's options (``images: own``: the student's own images). A variant (``from``) trains on
# its source regime's set with ``interact`` overrides and links the stages it shares with the same seed of
# the source (``link``): they would compute the same thing, so the rows differ only in what they vary.
REGIMES: dict[str, dict] = {
    "own": {"images": "own"},
    "new": {},
    "noise10": {"noise": 0.1},
    "noise30": {"noise": 0.3},
    "noise50": {"noise": 0.5},
    "free": {"answers": "free"},
    "working": {"answers": "working"},
    "teacher": {"labels": "teacher"},
    # The student's own images with the teacher's answers: sequence-level KD on the default set.
    "own_teacher": {"labels": "teacher", "images": "own"},
    # 30% wrong answers for steps 1-2 and the SFT control; VLsI's step 3 (and the KD control's) on the
    # teacher's answers to the same images: the step-3 variant the paper allows where labels are bad.
    "noise30_t3": {
        "from": "noise30",
        "step3": "teacher",
        "link": (*STEP1, "step2_interact", "control_sft", "control_kd_step2"),
    },
    # On-policy step 2 (``interact --lmbda P``): VLsI and, in the KD control, GKD; the SFT control is shared.
    **{
        f"{source}_p{tag}": {"from": source, "interact": {"lmbda": p}, "link": (*STEP1, "control_sft")}
        for source in ("own", "noise30")
        for tag, p in (("05", 0.5), ("1", 1.0))
    },
    # The paper's ablation rows on the default set: only step 2's matching or operations change, so both
    # controls are shared (final-layer KD is il=none, ll=kld whatever the matching).
    **{
        f"own:{name}": {
            "from": "own",
            "interact": overrides,
            "link": (*STEP1, "control_sft", "control_kd_step2", "control_kd"),
        }
        for name, overrides in ABLATION.items()
    },
}
# What a regime name says about its data, not how it trains on it.
VARIANT_KEYS = ("from", "interact", "link", "step3", "labels", "images")
ROWS = ("sft_control", "final_layer_kd", "vlsi_step2", "vlsi")


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


def _images(path: Path) -> int:
    return len({r["image"] for r in json.loads(path.read_text())})


def regime_data(out: Path, bases: Path, name: str, seed: int, new_images: int = NEW_IMAGES) -> Path:
    """The regime's distillation file (built once; the images are those of every regime)."""
    options = REGIMES[name]
    if "from" in options:
        return regime_data(out, bases, options["from"], seed, new_images)
    labels = options.get("labels", "data")
    if options.get("images") == "own":
        source = bases / "data" / "train.json"
    else:
        root = out / "data" / (name if labels == "data" else "new")
        source = root / "distill.json"
        if not source.exists():
            # The bases' test and validation images are regenerated (same seed, same streams) so the new
            # images avoid their digit combinations.
            held = {split: _images(bases / "data" / f"{split}.json") for split in ("test", "val")}
            data_options = {k: v for k, v in options.items() if k not in VARIANT_KEYS}
            generate(
                DigitsConfig(out=str(root), train=0, **held, distill=new_images, seed=seed, **data_options)
            )
            for split in ("test", "val"):
                if (root / f"{split}.json").read_bytes() != (bases / "data" / f"{split}.json").read_bytes():
                    raise SystemExit(
                        f"{bases}: its {split} split is not seed {seed}'s; pass the bases' --data-seed"
                    )
    if labels == "teacher":
        labelled = out / "data" / name / "distill.json"
        if not labelled.exists():
            relabel(str(bases / "teacher_sft"), source, labelled)
        return labelled
    return source


def shared_eval(out: Path, bases: Path) -> Path:
    """Teacher and student base, scored once on both splits; every run links them."""
    root = out / "shared_eval"
    for split, sub in (("test", "eval"), ("val", "eval_val")):
        for key, model in (("teacher", "teacher_sft"), ("student_base", "student_sft")):
            target = root / sub / key
            if not (target / "metrics.json").exists():
                data = bases / "data" / f"{split}.json"
                evaluate(
                    EvalConfig(model=str(bases / model), data=str(data), out=str(target), score="number")
                )
    return root


def run_regime(
    out: Path,
    bases: Path,
    shared: Path,
    name: str,
    seed: int,
    data: tuple[Path, Path | None],
    threads: int,
    extra: list[str],
    source: Future | None = None,
) -> Path:
    """One seed of one regime; ``data`` is its distillation file and step 3's own file (None: the same).
    A variant waits for its ``source`` run of the same seed, then links the stages it shares with it; a
    stage the source has not finished (or a source not in the sweep) is trained here instead."""
    options = REGIMES[name]
    root = out / name / f"seed{seed}"
    for sub in ("eval", "eval_val"):
        for key in ("teacher", "student_base"):
            _link(shared / sub / key, root / sub / key)
    if (root / "results.json").exists():
        return root
    if source is not None:
        source.result()
    for stage in options.get("link", ()):
        done = out / options["from"] / f"seed{seed}" / stage
        if (done / "train_summary.json").exists():
            _link(done, root / stage)
    config = {
        "out": str(root),
        "teacher": str(bases / "teacher_sft"),
        "student": str(bases / "student_sft"),
        "train_data": str(data[0]),
        "step3_data": str(data[1] or ""),
        "test_data": str(bases / "data" / "test.json"),
        "val_data": str(bases / "data" / "val.json"),
        "seed": seed,
        "controls": True,
        "score": "number",
        **{k: TINY_PRESET[k] for k in ("verbalize", "sft")},
        "interact": {**TINY_PRESET["interact"], **options.get("interact", {})},
    }
    path = root / "regime.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    _run(
        [sys.executable, "-m", "vlsi.run.cli", "distill", "--config", str(path), *extra],
        root / "log.txt",
        threads,
    )
    return root


def mean_se(values: list[float]) -> tuple[float, float]:
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return 100 * statistics.mean(values), 100 * se


def summarize(out: Path, seeds: list[int], regimes: list[str]) -> dict:
    summary = {}
    for name in regimes:
        per_split = {}
        for split, file in (("test", "results.json"), ("val", "results_val.json")):
            runs = [out / name / f"seed{s}" / file for s in seeds]
            done = [json.loads(p.read_text()) for p in runs if p.exists()]
            if not done:
                continue
            acc = {k: [r[k]["accuracy"] for r in done] for k in ("teacher", "student_base", *ROWS)}
            per_split[split] = {
                "seeds": len(done),
                "accuracy": {k: mean_se(v) for k, v in acc.items()},
                "vlsi_minus_sft": mean_se(
                    [a - b for a, b in zip(acc["vlsi"], acc["sft_control"], strict=True)]
                ),
                "kd_minus_sft": mean_se(
                    [a - b for a, b in zip(acc["final_layer_kd"], acc["sft_control"], strict=True)]
                ),
                "step2_minus_sft": mean_se(
                    [a - b for a, b in zip(acc["vlsi_step2"], acc["sft_control"], strict=True)]
                ),
            }
            if source := REGIMES[name].get("from"):
                # A variant against its source, seed by seed (the seeds both have finished).
                sources = [out / source / f"seed{s}" / file for s in seeds]
                pairs = [
                    (json.loads(p.read_text()), json.loads(o.read_text()))
                    for p, o in zip(runs, sources, strict=True)
                    if p.exists() and o.exists()
                ]
                per_split[split]["minus_source"] = {
                    k: mean_se([v[k]["accuracy"] - o[k]["accuracy"] for v, o in pairs])
                    for k in ("vlsi", "vlsi_step2", "final_layer_kd")
                }
        if per_split:
            summary[name] = per_split
    return summary


def markdown(summary: dict, split: str, names: list[str], title: str) -> str:
    def cell(pair, sign="+"):
        text = f"{pair[0]:{sign}.1f}"
        return text if math.isnan(pair[1]) else f"{text} ± {pair[1]:.1f}"

    # Variants also against their source regime, paired by seed.
    paired = any("minus_source" in summary.get(n, {}).get(split, {}) for n in names)
    extra = " | VLsI − source | step 2 − source | KD − source" if paired else ""
    lines = [
        f"| {title} ({split}) | seeds | teacher | base | SFT control | final-layer KD | VLsI after step 2 | VLsI "
        f"| VLsI − SFT | KD − SFT | step 2 − SFT{extra} |",
        "| --- " * (11 + 3 * paired) + "|",
    ]
    for name in names:
        if split not in summary.get(name, {}):
            continue
        r = summary[name][split]
        acc = " | ".join(f"{r['accuracy'][k][0]:.1f}" for k in ("teacher", "student_base"))
        acc += " | " + " | ".join(cell(r["accuracy"][k], "") for k in ROWS)
        diffs = " | ".join(cell(r[k]) for k in ("vlsi_minus_sft", "kd_minus_sft", "step2_minus_sft"))
        if paired:
            source = r.get("minus_source")
            diffs += " | " + " | ".join(
                cell(source[k]) if source else "" for k in ("vlsi", "vlsi_step2", "final_layer_kd")
            )
        lines.append(f"| {name} | {r['seeds']} | {acc} | {diffs} |")
    return "\n".join(lines)


def tables(regimes: list[str]) -> dict[str, list[str]]:
    """The summary's tables: the map (regimes and step-3 variants), on-policy step 2 beside its off-policy
    source, and the ablation rows beside the default; each lists only the chosen regimes."""
    source = {n: REGIMES[n].get("from") for n in regimes}
    on_policy = [n for n in regimes if "lmbda" in REGIMES[n].get("interact", {})]
    ablation = [n for n in regimes if n.startswith("own:")]
    groups = {
        "regime": [n for n in regimes if n not in on_policy and n not in ablation],
        "on-policy": sorted({source[n] for n in on_policy} | set(on_policy)),
        "ablation": ["own", *ablation] if ablation else [],
    }
    return {title: names for title, names in groups.items() if names}


def chart(summary: dict, path: Path, split: str = "test") -> None:
    plt = _pyplot()
    names = [n for n in summary if split in summary[n]]
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3.8))
    bars = (
        ("vlsi_minus_sft", "VLsI − SFT"),
        ("kd_minus_sft", "final-layer KD − SFT"),
        ("step2_minus_sft", "VLsI after step 2 alone − SFT"),
    )
    for i, (key, label) in enumerate(bars):
        xs = [k + (i - 1) * 0.27 for k in range(len(names))]
        values = [summary[n][split][key] for n in names]
        ax.bar(
            xs,
            [v[0] for v in values],
            0.27,
            yerr=[0 if math.isnan(v[1]) else v[1] for v in values],
            label=label,
        )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel(f"{split} accuracy points vs the SFT control")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/regimes"))
    parser.add_argument(
        "--bases",
        type=Path,
        default=None,
        help="a tiny run's root with data/, *_sft/ (default: trained into OUT/bases)",
    )
    parser.add_argument(
        "--data-seed", type=int, default=0, help="the seed the bases' data was generated with"
    )
    parser.add_argument("--seeds", default="0,1,2,3,4", help="seeds of steps 1-3 and the controls")
    parser.add_argument("--regimes", default=",".join(REGIMES))
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run: a run's numbers depend on it (reduction order), so it is fixed, not "
        "derived from --jobs",
    )
    parser.add_argument(
        "--summarize", action="store_true", help="train nothing: the map of the runs already finished"
    )
    parser.add_argument(
        "--new-images", type=int, default=NEW_IMAGES, help="images of the new distillation sets"
    )
    args, extra = parser.parse_known_args(argv)  # anything else goes to every `vlsi distill`
    seeds = [int(s) for s in args.seeds.split(",")]
    regimes = [r.strip() for r in args.regimes.split(",")]
    if unknown := [r for r in regimes if r not in REGIMES]:
        raise SystemExit(f"unknown regimes {unknown}; choose from {list(REGIMES)}")
    t0 = time.perf_counter()
    if args.summarize:
        return write_summary(args.out, seeds, regimes, t0)
    bases = args.bases
    if bases is None:
        bases = args.out / "bases"
        _run(
            [sys.executable, "-m", "vlsi.run.cli", "baselines", "--out", str(bases)],
            bases / "log.txt",
            os.cpu_count() or 1,
        )

    def files(name: str) -> tuple[Path, Path | None]:
        step3 = REGIMES[name].get("step3")
        make = partial(regime_data, args.out, bases, seed=args.data_seed, new_images=args.new_images)
        return make(name), make(step3) if step3 else None

    data = {name: files(name) for name in regimes}
    shared = shared_eval(args.out, bases)
    # Seed-major order, regimes before their variants: every regime gets its first seeds before any gets its
    # last, and a variant's source is submitted (so started) before it, which waits for it.
    jobs: dict[tuple[str, int], Future] = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for variants in (False, True):
            for seed in seeds:
                for name in regimes:
                    options = REGIMES[name]
                    if ("from" in options) != variants:
                        continue
                    source = jobs.get((options.get("from", ""), seed))
                    jobs[name, seed] = pool.submit(
                        run_regime,
                        args.out,
                        bases,
                        shared,
                        name,
                        seed,
                        data[name],
                        args.threads,
                        extra,
                        source,
                    )
        for job in jobs.values():
            job.result()
    return write_summary(args.out, seeds, regimes, t0)


def write_summary(out: Path, seeds: list[int], regimes: list[str], t0: float) -> int:
    summary = summarize(out, seeds, sorted(set(regimes) | {REGIMES[n].get("from", n) for n in regimes}))
    groups = tables(regimes)
    text = "\n\n".join(
        markdown(summary, split, names, title) for title, names in groups.items() for split in ("test", "val")
    )
    print(text)
    print(f"regimes done in {time.perf_counter() - t0:.0f} s")
    (out / "regimes.md").write_text(text + "\n")
    (out / "regimes.json").write_text(json.dumps({"seeds": seeds, "regimes": summary}, indent=2))
    if "regime" in groups:
        chart({n: summary[n] for n in groups["regime"] if n in summary}, out / "regimes.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
