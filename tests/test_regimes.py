"""benchmarks/regimes.py and benchmarks/plateau.py on seconds-long bases: every regime's data, runs and map."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from vlsi.run.cli import main as vlsi

ROOT = Path(__file__).resolve().parents[1]
# Bases of a few steps (the teacher enough to answer something: its answers are a regime's labels).
BASES = (
    "--train 16 --pool 24 --val 3 --test 4 --vision-steps 2 --eval-every 2 --steps 40 --student-steps 4 "
    "--batch-size 4"
).split()
STEPS = (
    "--verbalize-max-steps 2 --verbalize-batch-size 4 --interact-max-steps 2 --interact-batch-size 4 "
    "--interact-save-every 0 --sft-max-steps 2 --sft-batch-size 4 --sft-save-every 0 --eval-batch-size 8"
).split()


def _load(name: str, monkeypatch):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    monkeypatch.syspath_prepend(str(path.parent))
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    out = tmp_path_factory.mktemp("bases")
    assert vlsi(["baselines", "--out", str(out), *BASES]) == 0
    return out


@pytest.mark.slow
def test_regime_map_runs_every_kind_of_distillation_set(bases, tmp_path, monkeypatch):
    regimes = _load("regimes", monkeypatch)
    out = tmp_path / "map"
    args = ["--out", str(out), "--bases", str(bases), "--seeds", "0,1", "--new-images", "6"]
    # Variants first: they wait for their sources.
    chosen = ["noise30_t3", "own_p1", "own", "noise30", "teacher", "own_teacher"]
    assert regimes.main([*args, "--regimes", ",".join(chosen), "--jobs", "2", *STEPS]) == 0
    summary = json.loads((out / "regimes.json").read_text())["regimes"]
    assert set(summary) == set(chosen)
    # Step 3 on the teacher's answers where the distillation set's are noisy; the SFT control keeps the noisy.
    resolved = yaml.safe_load((out / "noise30_t3" / "seed0" / "distill_config.yaml").read_text())
    assert resolved["train_data"].endswith("noise30/distill.json")
    assert resolved["step3_data"].endswith("teacher/distill.json")
    for splits in summary.values():
        for split in ("test", "val"):
            r = splits[split]
            assert r["seeds"] == 2
            vlsi_sft = r["accuracy"]["vlsi"][0] - r["accuracy"]["sft_control"][0]
            assert r["vlsi_minus_sft"][0] == pytest.approx(vlsi_sft)
    # Each regime trained on its own set: own = the student's 16 images, the others the 6 new ones.
    records = {
        name: json.loads((out / name / "seed0" / "control_sft" / "train_summary.json").read_text())["records"]
        for name in summary
    }
    assert records["own"] == 16 and records["noise30"] == 6
    assert 0 < records["teacher"] <= 6  # a record the teacher answers with nothing is dropped and counted
    assert 0 < records["own_teacher"] <= 16  # the student's own images, the teacher's answers
    own_teacher = yaml.safe_load((out / "own_teacher" / "seed0" / "distill_config.yaml").read_text())
    assert own_teacher["train_data"].endswith("own_teacher/distill.json")
    text = (out / "regimes.md").read_text()
    assert (out / "regimes.png").stat().st_size > 1000 and "| noise30 | 2 |" in text
    # The on-policy variant is tabled beside its off-policy source, not in the map.
    on_policy = text.split("| on-policy (test)")[1].split("\n\n")[0]
    assert "| own | 2 |" in on_policy and "| own_p1 | 2 |" in on_policy and "noise30" not in on_policy
    # Teacher and student base were scored once and linked into every run.
    assert (out / "own" / "seed1" / "eval" / "teacher").is_symlink()
    # A variant links what it shares with its source's run of the same seed and trains the rest.
    for seed in (0, 1):
        t3, p1 = out / "noise30_t3" / f"seed{seed}", out / "own_p1" / f"seed{seed}"
        assert (t3 / "step2_interact").resolve() == (
            out / "noise30" / f"seed{seed}" / "step2_interact"
        ).resolve()
        assert not (t3 / "step3_sft").is_symlink() and not (t3 / "control_kd").is_symlink()
        assert (p1 / "control_sft").is_symlink() and not (p1 / "control_kd_step2").is_symlink()
        assert yaml.safe_load((p1 / "distill_config.yaml").read_text())["interact"]["lmbda"] == 1.0


@pytest.mark.slow
def test_plateau_retrains_a_base_with_twice_its_steps(bases, tmp_path, monkeypatch):
    plateau = _load("plateau", monkeypatch)
    out = tmp_path / "plateau"
    code = plateau.main(["--root", str(bases), "--bases", "student", "--out", str(out)])
    row = json.loads((out / "plateau.json").read_text())["student"]
    assert row["steps"] == 4 and code == (0 if row["plateau"] else 1)
    longer = [json.loads(x) for x in (out / "student_x2" / "curve.jsonl").read_text().splitlines()]
    assert longer[-1]["step"] == 8 and row["gain_points"] == pytest.approx(
        100 * (longer[-1]["accuracy"] - row["val_accuracy"])
    )
