"""The multi-process path on CPU: the real ``vlsi sft`` / ``vlsi interact`` under ``accelerate launch`` with two
gloo processes, and the invariant that makes it trustworthy: one optimizer step over the same 4 records gives
the same loss and the same gradients as 2 processes x batch 2, 1 process x batch 4 and 1 process x batch 1 x
accumulation 4.

BatchStream gives each step the next ``batch_size * processes`` records of one seeded permutation, rank r taking
its r-th slice, so the three layouts see the same 4 records; the loss is normalised by the response tokens of
the whole window across processes, so their sums agree up to float rounding (padding differs per batch).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from grad_probe import probe

from vlsi.model.export import is_exported
from vlsi.run.cli import main

# Each test launches processes of its own and runs for minutes on a CPU.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CPU_CONFIG = ROOT / "configs" / "accelerate" / "cpu.yaml"
PROBE = Path(__file__).with_name("grad_probe.py")
SHARD_PROBE = Path(__file__).with_name("shard_probe.py")
EVAL_PROBE = Path(__file__).with_name("eval_probe.py")
GENERATION_PROBE = Path(__file__).with_name("generation_probe.py")
# CPU only (gloo), one thread per process: two processes share the CI machine's two cores.
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(args: list[str], dump: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """``accelerate launch`` with the shipped CPU config, running ``vlsi`` through the gradient probe."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CPU_CONFIG),
        "--main_process_port",
        str(_free_port()),
        str(PROBE),
        str(dump),
        *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def run_in_process(args: list[str], dump: Path) -> dict:
    with probe(dump):
        assert main(args) == 0
    return torch.load(dump)


def assert_same_step(got: dict, want: dict) -> None:
    # fp32 sums over other splits of the batch: up to 3e-5 relative on AVX-512 CPUs.
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert got["grads"].keys() == want["grads"].keys() and want["grads"]
    for name, grad in want["grads"].items():
        # Sums over differently padded batches and processes differ in rounding only.
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def assert_finished(out: Path, steps: int) -> None:
    assert is_exported(out) and (out / "model.safetensors").exists()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == steps and math.isfinite(summary["final_loss"])
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    # Both processes wrote their random states into the checkpoint.
    (ckpt,) = (out / "checkpoints").iterdir()
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }


# 2 processes x batch 2, 1 x 4, 1 x 1 x accumulation 4: 4 records per optimizer step in each.
LAYOUTS = {"1x4": "--batch-size 4", "1x1x4": "--batch-size 1 --grad-accum 4"}


def test_sft_two_processes_equal_one_process(tmp_path, tiny_models, synth_data):
    def args(out, layout):
        data = synth_data / "train.json"
        options = f"--lr 1e-3 --log-every 1 {layout}".split()
        return [
            "sft",
            "--model",
            str(tiny_models["student"]),
            "--data",
            str(data),
            "--out",
            str(out),
            *options,
        ]

    out = tmp_path / "2x2"
    launch_two_processes(
        [*args(out, "--batch-size 2"), "--max-steps", "2", "--save-every", "1"], tmp_path / "2x2.pt"
    )
    assert_finished(out, steps=2)
    two = torch.load(tmp_path / "2x2.pt")
    assert two["world"] == 2
    for name, layout in LAYOUTS.items():
        one = run_in_process([*args(tmp_path / name, layout), "--max-steps", "1"], tmp_path / f"{name}.pt")
        assert one["world"] == 1
        assert_same_step(two, one)


def test_interact_two_processes_equal_one_process(tmp_path, tiny_models, verbalizers, synth_data):
    def args(out, layout):
        return [
            "interact",
            *("--teacher", str(tiny_models["teacher"]), "--teacher-verbalizers", str(verbalizers["teacher"])),
            *("--student", str(tiny_models["student"]), "--student-verbalizers", str(verbalizers["student"])),
            *("--data", str(synth_data / "train.json"), "--out", str(out)),
            # uniform matching: the same pairs whatever each process's sampler would draw
            *("--strategy", "uniform", "--lr", "1e-3", "--log-every", "1"),
            *layout.split(),
        ]

    out = tmp_path / "2x2"
    launch_two_processes(
        [*args(out, "--batch-size 2"), "--max-steps", "2", "--save-every", "1"], tmp_path / "2x2.pt"
    )
    assert_finished(out, steps=2)
    assert (out / "verbalizers" / "verbalizers.safetensors").exists()
    matches = json.loads((out / "matches.json").read_text())
    assert matches["micro_batches_per_step"] == 2
    two = torch.load(tmp_path / "2x2.pt")
    assert any(name.startswith("verbalizers.") for name in two["grads"])
    for name, layout in LAYOUTS.items():
        one = run_in_process([*args(tmp_path / name, layout), "--max-steps", "1"], tmp_path / f"{name}.pt")
        assert_same_step(two, one)


def test_on_policy_interact_two_processes_equal_one_process(tmp_path, tiny_models, verbalizers, synth_data):
    """--lmbda 1: each process generates its records' answers with its own (unwrapped) copy of the student;
    the step is that of one process generating them all."""

    def args(out, layout):
        return [
            "interact",
            *("--teacher", str(tiny_models["teacher"]), "--teacher-verbalizers", str(verbalizers["teacher"])),
            *("--student", str(tiny_models["student"]), "--student-verbalizers", str(verbalizers["student"])),
            *("--data", str(synth_data / "train.json"), "--out", str(out)),
            *("--strategy", "uniform", "--lr", "1e-3", "--log-every", "1"),
            *("--lmbda", "1", "--gen-max-new-tokens", "4"),
            *layout.split(),
        ]

    out = tmp_path / "2x2"
    launch_two_processes(
        [*args(out, "--batch-size 2"), "--max-steps", "2", "--save-every", "1"], tmp_path / "2x2.pt"
    )
    assert_finished(out, steps=2)
    two = torch.load(tmp_path / "2x2.pt")
    two_row, _ = [json.loads(line) for line in (out / "on_policy.jsonl").read_text().splitlines()]
    one = run_in_process([*args(tmp_path / "1x4", "--batch-size 4"), "--max-steps", "1"], tmp_path / "1x4.pt")
    (one_row,) = [
        json.loads(line) for line in (tmp_path / "1x4" / "on_policy.jsonl").read_text().splitlines()
    ]
    # The main process logs its own half: the first two records of the one-process batch, the same answers.
    assert two_row["records"] == one_row["records"][:2] and two_row["responses"] == one_row["responses"][:2]
    assert_same_step(two, one)


def test_the_frozen_teacher_sharded_over_two_processes_reads_the_same(
    tmp_path, tiny_models, verbalizers, synth_data
):
    """The FSDP2 teacher path (accelerate runs FSDP only on GPUs, so the sharding is driven directly here)."""
    result = tmp_path / "shard.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), str(SHARD_PROBE), str(tiny_models["teacher"])]
    cmd += [str(verbalizers["teacher"]), str(synth_data / "train.json"), str(result)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    got = json.loads(result.read_text())
    assert got["max_diff"] < 1e-5  # every verbalizer's and the final layer's logits
    assert got["layer_shard_fraction"] == 0.5  # after its forward, each process holds half of a layer again
    assert got["head_whole"]  # the verbalizers call the head outside the model's forward
    assert (
        got["export_diff"] == 0.0 and got["sharded_after_export"]
    )  # engines.whole_weights, as exports use it
    # Built sharded from the checkpoint (engines.load_frozen_sharded): the very same weights and buffers.
    assert got["loaded_export_diff"] == 0.0 and got["loaded_buffers_equal"]
    assert got["loaded_max_diff"] < 1e-5 and got["loaded_shard_fraction"] == 0.5
    assert got["tied_export_diff"] == 0.0  # a head tied to the embedding (Qwen2-VL-2B) stays tied


# ---------------------------------------------------------------------------------------- FSDP2 probe

FSDP_PROBE = Path(__file__).with_name("fsdp_probe.py")
# A teacher whose decoder layers dominate its weights (126 MB in fp32), so that what each process holds of
# it is measurable against the process's own ~0.5 GB; the student is the tiny one.
PROBE_TEACHER = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=2048)
PROBE_STEPS, PROBE_ACCUM = 2, 2


def _probe_pair(root: Path) -> dict:
    from vlsi.model.backbone import Backbone
    from vlsi.model.loading import load_model
    from vlsi.model.tiny import LMSize, TinyConfig
    from vlsi.model.tiny_models import build_tiny
    from vlsi.model.verbalizer import base_model_info, build_verbalizers

    paths = build_tiny(TinyConfig(out=str(root / "models"), teacher=LMSize(**PROBE_TEACHER)))
    for name in ("teacher", "student"):
        backbone = Backbone(load_model(paths[name], dtype=torch.float32))
        layers = list(range(backbone.num_layers - 1))
        out = root / f"{name}_verbalizers"
        paths[f"{name}_verbalizers"] = build_verbalizers(backbone, layers).save(
            out, base_model_info(backbone)
        )
    return paths


def _without_image(record: dict) -> dict:
    turns = [dict(t, value=t["value"].replace("<image>", "").strip()) for t in record["conversations"]]
    return {k: v for k, v in record.items() if k != "image"} | {"conversations": turns}


def _rank_one_text_only(synth_data: Path, path: Path) -> Path:
    """The synthetic train set reordered so that, at batch 1 over 2 processes, every micro-batch of process 0
    has an image and every one of process 1 has none."""
    from vlsi.data.records import BatchStream

    records = json.loads((synth_data / "train.json").read_text())
    with_image = [r for r in records if "image" in r]
    text_only = [_without_image(r) for r in with_image]
    out = list(records)
    micro = PROBE_STEPS * PROBE_ACCUM
    for rank, pool in ((0, with_image), (1, text_only)):
        stream = BatchStream(len(records), 1, 0, rank, 2)
        for _ in range(micro):
            (index,) = stream.next_indices()
            out[index] = pool.pop()
    path.write_text(json.dumps(out))
    return path


def _interact_args(paths: dict, data: Path, images: Path, out: Path, accum: int) -> list[str]:
    return [
        "interact",
        *("--teacher", str(paths["teacher"]), "--teacher-verbalizers", str(paths["teacher_verbalizers"])),
        *("--student", str(paths["student"]), "--student-verbalizers", str(paths["student_verbalizers"])),
        *("--data", str(data), "--image-root", str(images), "--out", str(out)),
        *("--strategy", "uniform", "--lr", "1e-3", "--log-every", "1", "--precision", "fp32"),
        *("--batch-size", "1", "--grad-accum", str(accum), "--max-steps", str(PROBE_STEPS)),
        "--no-group-by-length",  # _rank_one_text_only places the records by the plain shuffle
    ]


@pytest.fixture(scope="module")
def fsdp_probe(tmp_path_factory, synth_data):
    """The real ``vlsi interact`` under FSDP2 over 2 gloo processes, where process 1 only ever sees text-only
    micro-batches, next to the same command in one process at accumulation 4 (the same 4 records a step)."""
    root = tmp_path_factory.mktemp("fsdp_probe")
    paths = _probe_pair(root)
    data = _rank_one_text_only(synth_data, root / "train.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), str(FSDP_PROBE), str(root / "seen")]
    cmd += _interact_args(paths, data, synth_data, root / "two", PROBE_ACCUM)
    # A process left waiting in a collective hangs, so a run that desynchronises is stopped here.
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
        failure = None if run.returncode == 0 else run.stdout[-3000:] + run.stderr[-5000:]
    except subprocess.TimeoutExpired as e:
        failure = f"timed out (a process waiting in a collective): {str(e.stderr)[-3000:]}"
    assert main(_interact_args(paths, data, synth_data, root / "one", 2 * PROBE_ACCUM)) == 0
    seen = None if failure else [json.loads((root / f"seen.{r}.json").read_text()) for r in range(2)]
    return {"failure": failure, "seen": seen, "paths": paths, "root": root}


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_fsdp2_text_only_micro_batches_on_one_process_train_as_one_process(fsdp_probe):
    """A process whose micro-batches carry no image still runs the (sharded) vision blocks: no hang, and the
    losses are those of one process on the same records."""
    assert fsdp_probe["failure"] is None, fsdp_probe["failure"]
    two, one = _log(fsdp_probe["root"] / "two"), _log(fsdp_probe["root"] / "one")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, PROBE_STEPS + 1))
    for got, want in zip(two, one, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)


def test_fsdp2_reduce_scatters_only_on_the_last_micro_batch_of_a_window(fsdp_probe):
    """Gradients are reduced once per optimizer step (as accelerate's ``accumulate`` does), not once per
    micro-batch; the losses above show the result is the same."""
    assert fsdp_probe["failure"] is None, fsdp_probe["failure"]
    for seen in fsdp_probe["seen"]:
        assert seen["synced"] == [False] * (PROBE_ACCUM - 1) + [True] + [False] * (PROBE_ACCUM - 1) + [True]


def test_fsdp2_each_process_holds_the_parameter_bytes_vlsi_plan_estimates(fsdp_probe):
    """memory.estimate_memory's step-2 weights (less the two layers gathered only while they run) against
    what each process holds: the teacher's decoder layers and its (fp32 here) verbalizers sharded, its
    embeddings, head and vision tower whole, the student and its verbalizers sharded."""
    from vlsi.run.memory import estimate_memory
    from vlsi.run.plan import complete_recipe, summarize

    assert fsdp_probe["failure"] is None, fsdp_probe["failure"]
    paths = fsdp_probe["paths"]
    teacher, student = summarize(str(paths["teacher"])), summarize(str(paths["student"]))
    recipe = complete_recipe(
        {
            "teacher": str(paths["teacher"]),
            "student": str(paths["student"]),
            "teacher_layers": ",".join(map(str, range(teacher.num_layers - 1))),
            "student_layers": ",".join(map(str, range(student.num_layers - 1))),
            "interact": {"batch_size": 1, "grad_accum": PROBE_ACCUM},
        }
    )
    memory, _, _ = estimate_memory(teacher, student, recipe, "fsdp", 2, frozen_bytes=4)["2 interact"]
    estimate = memory.weights - memory.gathered
    for seen in fsdp_probe["seen"]:
        held = sum(seen["resident"].values())
        assert held == pytest.approx(estimate, rel=0.10), (seen["resident"], estimate)


def test_fsdp2_no_process_holds_the_whole_teacher_in_host_ram(fsdp_probe):
    """Each process's peak RSS while the teacher and its verbalizers load grows by less than the whole teacher
    and its verbalizers (129 + 22 MB here), which a whole load needs at least (188-220 MB were measured before
    the sharded load): what it keeps (its half of the decoder layers and of the verbalizers, the whole
    embeddings, head and vision tower; 77 MB) plus the allocator's and the libraries' own growth, which
    measured 14-37 MB (a fixed 32 MiB allowance failed on a clean clone at 37)."""
    from vlsi.model.verbalizer import WEIGHTS_FILE
    from vlsi.run.plan import summarize

    assert fsdp_probe["failure"] is None, fsdp_probe["failure"]
    paths = fsdp_probe["paths"]
    teacher_bytes = summarize(str(paths["teacher"])).total * 4
    verbalizer_file = (paths["teacher_verbalizers"] / WEIGHTS_FILE).stat().st_size
    for seen in fsdp_probe["seen"]:
        kept = seen["resident"]["teacher"] + seen["resident"]["teacher_verbalizers"]
        assert kept < 0.55 * (teacher_bytes + verbalizer_file)
        grew = seen["teacher_load"]["peak"] - seen["teacher_load"]["rss_before"]
        assert grew < teacher_bytes + verbalizer_file, (grew, kept, teacher_bytes + verbalizer_file)


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory):
    """The tiny Qwen3-VL MoE teacher and student (``vlsi tiny --family qwen3_vl_moe``), each with logit-lens
    verbalizers on every layer but its last."""
    from vlsi.model.backbone import Backbone
    from vlsi.model.loading import load_model
    from vlsi.model.tiny import TinyConfig
    from vlsi.model.tiny_models import build_tiny
    from vlsi.model.verbalizer import base_model_info, build_verbalizers

    root = tmp_path_factory.mktemp("moe")
    paths = build_tiny(TinyConfig(out=str(root / "models"), family="qwen3_vl_moe"))
    for name in ("teacher", "student"):
        backbone = Backbone(load_model(paths[name], dtype=torch.float32))
        layers = list(range(backbone.num_layers - 1))
        paths[f"{name}_verbalizers"] = build_verbalizers(backbone, layers).save(
            root / f"{name}_verbalizers", base_model_info(backbone)
        )
    return paths


def test_step2_with_an_moe_teacher_sharded_over_two_processes_equals_one_process(
    tmp_path, moe_pair, synth_data
):
    """FSDP2 shards the frozen MoE teacher's decoder layers (its fused experts among them) over two processes;
    its verbalized logits and step 2's loss are those of the whole teacher in one process."""
    result = tmp_path / "shard.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), str(SHARD_PROBE), str(moe_pair["teacher"])]
    cmd += [str(moe_pair["teacher_verbalizers"]), str(synth_data / "train.json"), str(result)]
    cmd += [str(moe_pair["student"]), str(moe_pair["student_verbalizers"])]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    got = json.loads(result.read_text())
    assert got["max_diff"] < 1e-5 and got["layer_shard_fraction"] == 0.5
    assert got["loss_whole"] > 0 and got["loss_sharded"] == pytest.approx(got["loss_whole"], rel=1e-5)
    # Fused experts are not read row by row: engines.load_frozen loads such a teacher whole, then shards it.
    assert "needs a weight conversion" in got["loaded_skipped"]


def test_sft_learning_curve_on_a_sharded_student_is_taken_by_every_process(tmp_path, tiny_models, synth_data):
    """``sft --eval-data`` under FSDP2: the point's generation all-gathers shards, so every process takes part."""
    result = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), str(EVAL_PROBE), str(tiny_models["student"])]
    cmd += [str(synth_data / "test.json"), str(result)]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=ENV, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the sharded evaluation hung: {(e.stderr or b'')[-3000:]!r}")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    # Scored against the unsharded student's own answers: the sharded one gives every one of them.
    assert json.loads(result.read_text())["accuracy"] == 1.0


def test_on_policy_answers_of_a_student_sharded_over_two_processes(tmp_path, tiny_models, synth_data):
    """FSDP2: the generation copy, synced from the sharded student, answers as the whole student does, each
    process its own prompts and number of tokens, with no collective during generation."""
    prefix = tmp_path / "generation"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), str(GENERATION_PROBE), str(tiny_models["student"])]
    cmd += [str(synth_data / "train.json"), str(prefix)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=ENV, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    for rank, prompts in ((0, 1), (1, 3)):
        got = json.loads(Path(f"{prefix}.{rank}.json").read_text())
        assert got["answers_equal"] and len(got["answers"]) == prompts
        assert got["copy_diff"] == 0.0 and got["still_sharded"]


def test_teacher_cache_built_by_two_processes_equals_one_process(
    tmp_path, tiny_models, verbalizers, synth_data
):
    """``accelerate launch ... teacher-cache``: the records sharded over the processes (process p writes shards
    p, p + 2, ...), one cache at the end, the very one a single process builds; the records skipped in another
    process's shards are counted in the index as one process counts them."""
    from safetensors import safe_open

    from vlsi.train.teacher_cache import INDEX_FILE, TeacherCache, shard_path

    folder = tmp_path / "synth"
    shutil.copytree(synth_data, folder)
    records = json.loads((folder / "train.json").read_text())
    records[10] = {**records[10], "id": "missing", "image": "nowhere.png"}  # shard 1: process 1's
    data = folder / "train_with_bad.json"
    data.write_text(json.dumps(records))

    def args(out):
        return ["teacher-cache", "--teacher", str(tiny_models["teacher"]), "--teacher-verbalizers",
                str(verbalizers["teacher"]), "--data", str(data), "--out", str(out), "--batch-size", "3",
                "--shard-records", "8", "--top-k", "16"]  # fmt: skip

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(one)) == 0
    launch_two_processes(args(two), tmp_path / "unused.pt")
    index = {name: json.loads((root / INDEX_FILE).read_text()) for name, root in (("one", one), ("two", two))}
    for name, root in (("one", one), ("two", two)):
        assert index[name]["settings"].pop("out") == str(root)  # where each was asked to go
    assert index["two"] == index["one"] and index["one"]["complete"] and index["one"]["shards"] == 3
    assert index["one"]["skipped_by_reason"] == {"image not found": 1}
    for shard in range(index["one"]["shards"]):
        with (
            safe_open(str(shard_path(one, shard)), "pt") as a,
            safe_open(str(shard_path(two, shard)), "pt") as b,
        ):
            assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), (shard, key)
    assert len(TeacherCache(two)) == len(records)
