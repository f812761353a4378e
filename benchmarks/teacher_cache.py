"""Side by side: step 2 with the live teacher, with a cached one (vlsi teacher-cache), and the student alone.

    PYTHONPATH=src python benchmarks/teacher_cache.py --out bench_cache.json          # CPU, a few minutes
    PYTHONPATH=src python benchmarks/teacher_cache.py --device cuda --preset gpu --out bench_cache_gpu.json
    PYTHONPATH=src python benchmarks/teacher_cache.py --quick --out /tmp/smoke.json    # seconds

Random-weight Qwen2-VL language models with the real vocabulary, the presets of
``benchmarks/verbalized_losses.py`` (``cpu``: student 512 x 8 layers, teacher 1024 x 16, 151,936 tokens), with
trained-looking verbalizers (non-zero FFNs). On one batch of ``--tokens`` response tokens, in one process:

- ``cache``: the teacher's side once, what ``vlsi teacher-cache`` does per batch (forward, top-k of every
  target layer and of the output) at each ``--k``, with the bytes per response token of a shard written by
  the cache's own writer;
- ``agreement``: the live step's scores, matches and losses against the cached ones at each ``--k``: the
  share of ``--draws`` seeds whose matched layers are all identical, per student layer, and the relative
  error of the scores and of the losses;
- ``live``: step 2 as :mod:`vlsi.train.interact` runs it: the teacher forward without grad, the student and its
  verbalizers with their graph, the matching scores and the chunked losses, backward, AdamW;
- ``cached``: the same step with the teacher read from top-``--k-time`` buckets, measured after the
  teacher's weights are freed (glibc is told to return large blocks, so the resident set drops with them);
- ``student``: the student-only work the cached step cannot avoid, its SFT-like forward and backward plus
  the verbalized heads: next-token CE through the head at every student target layer and the last one.

Times are the fastest of ``--steps`` measured steps after one warm-up (forward + backward + update). Peak
memory is the process's resident high-water mark over the measured steps (CPU; weights included, which is
the point), or ``torch.cuda.max_memory_allocated`` (CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO / "src", REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import verbalized_losses as vl  # noqa: E402  (the shared presets, models, batches and memory probe)

KS = (16, 64, 256)


def _build(lm, layers, seed: int, device: str):
    """A random-weight model and trained-looking verbalizers (a non-zero FFN; an untrained one is the logit
    lens), the same for the same seed."""
    from vlsi.model.backbone import Backbone
    from vlsi.model.verbalizer import VerbalizerConfig, build_verbalizers

    backbone = Backbone(vl.build_model(lm, seed, device))
    torch.manual_seed(seed + 2)
    return backbone, build_verbalizers(backbone, layers, VerbalizerConfig(zero_init=False))


def _interaction(student, verbalizers, chunk: int):
    from vlsi.train.interact import InteractConfig, InteractingStudent

    cfg = InteractConfig(student="", student_verbalizers="", data="", out="", loss_chunk_tokens=chunk)
    return InteractingStudent(student.model, verbalizers, cfg)


@torch.no_grad()
def _teacher_dists(teacher, t_verb, batch, k: int, chunk: int, width: int) -> dict:
    """What ``vlsi teacher-cache`` computes per batch: the teacher forward, then the top-k of every target
    layer and of the output, stored as float16 log-probabilities."""
    from vlsi.losses.sparse import SparseDist
    from vlsi.train.interact import Reader, teacher_response_states
    from vlsi.train.teacher_cache_build import TeacherCacheConfig, _topk

    cfg = TeacherCacheConfig(teacher="", teacher_verbalizers="", data="", out="", top_k=k, chunk_tokens=chunk)
    states = teacher_response_states(teacher, t_verb.layers, batch)
    read = Reader(teacher, t_verb)
    dists = {key: _topk(read, key, states[key], cfg, width) for key in [*t_verb.layers, "final"]}
    # Read back as the cache returns them: float16 on disk.
    return {key: SparseDist(d.ids, d.logp.half().float(), d.tail, d.width) for key, d in dists.items()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _stepper(args, loss_fn, optimizer, batch):
    """One optimizer step of ``loss_fn`` (forward, backward, update) -> (seconds, loss)."""
    n = max(1, int((batch["labels"][:, 1:] != -100).sum()))

    def step() -> tuple[float, float]:
        start = time.perf_counter()
        with torch.autocast(args.device, torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = loss_fn() / n
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(args.device)
        return time.perf_counter() - start, float(loss.detach())

    return step


def _write(dists: dict, k: int, root: Path) -> dict:
    """The batch as one record of a real shard (vlsi.train.teacher_cache_build), float16 log-probabilities."""
    from vlsi.train.teacher_cache import bytes_per_token
    from vlsi.train.teacher_cache_build import _write_shard

    path = root / f"shard-k{k}.safetensors"
    row = {"record_hash": torch.zeros(8, dtype=torch.uint8), "token_hash": torch.zeros(8, dtype=torch.uint8)}
    width, keys = dists["final"].width, list(dists)
    tokens = _write_shard(path, [{**row, "teacher": dists}], keys, min(k, width), "float16", "bench")
    return {
        "bytes_per_response_token": path.stat().st_size / tokens,
        "bytes_per_response_token_formula": bytes_per_token(len(keys), k, width, "float16"),
    }


@torch.no_grad()
def _agreement(args, student, s_verb, teacher, t_verb, batch, cached: dict) -> dict:
    """Live vs cached scores, matches and losses on the same batch, at every k."""
    from vlsi.losses.chunked import head_weight, score_matrix
    from vlsi.losses.matching import MatchingConfig, match_layers
    from vlsi.losses.sparse import sparse_score_matrix
    from vlsi.model.verbalizer import response_states
    from vlsi.train.interact import Reader, teacher_response_states

    read = Reader(teacher, t_verb)
    live = teacher_response_states(teacher, t_verb.layers, batch)
    hidden = student.layer_states(s_verb.layers, batch)
    feats = [s_verb.features(x, response_states(hidden[x], batch["labels"])[0]) for x in s_verb.layers]
    t_feats = [read.features(x, live[x]) for x in t_verb.layers]
    w_s, w_t = head_weight(student.lm_head), head_weight(teacher.lm_head)
    n = len(feats[0])
    dense = score_matrix(feats, w_s, t_feats, w_t, "forward_kl", chunk=args.chunk) / n
    module = _interaction(student, s_verb, args.chunk)
    gen, matching = torch.Generator, MatchingConfig()
    live_loss, live_parts, _ = module(batch, live, read, t_verb.layers, gen().manual_seed(0))
    live_draws = [
        match_layers(dense, matching, gen().manual_seed(s)).teacher_index for s in range(args.draws)
    ]
    result = {}
    for k, dists in cached.items():
        t_dists = [dists[x] for x in t_verb.layers]
        sparse = sparse_score_matrix(feats, w_s, t_dists, "forward_kl", chunk=args.chunk) / n
        draws = [
            match_layers(sparse, matching, gen().manual_seed(s)).teacher_index for s in range(args.draws)
        ]
        pairs = list(zip(live_draws, draws, strict=True))
        loss, parts, _ = module(batch, dists, None, t_verb.layers, gen().manual_seed(0))
        result[k] = {
            "match_agreement": sum(a == b for a, b in pairs) / len(pairs),
            "match_agreement_per_student_layer": [
                sum(a[i] == b[i] for a, b in pairs) / len(pairs) for i in range(len(s_verb.layers))
            ],
            "score_rel_error": float(((sparse - dense).abs() / dense.abs()).max()),
            "loss_rel_error": float(abs(loss - live_loss) / live_loss),
            "ll_rel_error": float(abs(parts["ll"] - live_parts["ll"]) / live_parts["ll"]),
            "il_rel_error": float(abs(parts["il"] - live_parts["il"]) / live_parts["il"]),
        }
    return {"per_k": result, "live_scores": dense.tolist()}


def run(args) -> dict:
    """Every measurement in this one process, in the order that lets each peak hold only its own models:
    the teacher's side and the live step first, then, the teacher freed, the cached and student-only steps."""
    from vlsi.losses.chunked import LABELS, Term, head_losses, head_weight
    from vlsi.model.verbalizer import response_states
    from vlsi.train.interact import Reader, teacher_response_states

    if args.device == "cpu":
        with contextlib.suppress(OSError):
            vl._release_large_blocks()  # freed weights leave the resident set, so later peaks exclude them
    preset = vl.PRESETS[args.preset]
    ks = sorted({*args.k, args.k_time})
    width = min(preset.student.vocab, preset.teacher.vocab)
    batch = vl.make_batch(preset, args.tokens, args.device, args.batch)
    tokens = args.tokens * args.batch
    clock = time.perf_counter()

    def done(what):
        print(f"  {what:>22}: {time.perf_counter() - clock:6.1f} s", file=sys.stderr)

    teacher, t_verb = _build(preset.teacher, preset.teacher_layers, args.seed + 1, args.device)
    teacher.model.eval().requires_grad_(False)
    t_verb.requires_grad_(False)
    student, s_verb = _build(preset.student, preset.student_layers, args.seed, args.device)
    params = [*student.model.parameters(), *s_verb.parameters()]
    student.model.train()
    done("models")

    cache, cached = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        _teacher_dists(teacher, t_verb, batch, ks[0], args.chunk, width)  # warm-up
        for k in ks:
            _sync(args.device)
            start = time.perf_counter()
            cached[k] = _teacher_dists(teacher, t_verb, batch, k, args.chunk, width)
            _sync(args.device)
            cache[k] = {"write_s_per_response_token": (time.perf_counter() - start) / tokens}
            cache[k] |= _write(cached[k], k, Path(tmp))
    done("cache")
    agreement = _agreement(args, student, s_verb, teacher, t_verb, batch, cached)
    done("agreement")

    generator = torch.Generator().manual_seed(0)
    module = _interaction(student, s_verb, args.chunk)
    held = {"teacher": teacher, "verbalizers": t_verb, "read": Reader(teacher, t_verb)}
    del teacher, t_verb
    timed = {key: d.to(args.device) for key, d in cached[args.k_time].items()}
    del cached
    last = student.num_layers - 1

    def live_step():
        layers = held["verbalizers"].layers
        states = teacher_response_states(held["teacher"], layers, batch)
        return module(batch, states, held["read"], layers, generator)[0]

    def cached_step():
        return module(batch, timed, None, preset.teacher_layers, generator)[0]

    def student_step():
        hidden = student.layer_states(sorted({*s_verb.layers, last}), batch)
        terms = []
        for layer in [*s_verb.layers, "final"]:
            h, target = response_states(hidden[last if layer == "final" else layer], batch["labels"])
            features = student.final_norm(h) if layer == "final" else s_verb.features(layer, h)
            terms.append(Term(features, LABELS, target=target))
        return head_losses(terms, head_weight(student.lm_head), chunk=args.chunk)[0]

    # One optimizer for all three: the same student state (weights, AdamW moments) in every configuration.
    optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-7)
    fns = {name: _stepper(args, fn, optimizer, batch) for name, fn in
           (("live", live_step), ("cached", cached_step), ("student", student_step))}  # fmt: skip
    for step in fns.values():
        step()  # optimizer state, allocator, kernels
    memory = vl.Memory(args.device)
    runs = {name: [] for name in fns}
    peaks = {}
    # Interleaved, so that a machine whose load changes over the run slows the three alike.
    for _ in range(args.steps):
        for name, step in fns.items():
            memory.reset()
            runs[name].append(step())
            peaks[name] = max(peaks.get(name, 0.0), memory.peak())
    done("timed steps")
    # The teacher leaves: what remains resident is the student, its optimizer and the cached batch, so the
    # peaks of these two steps hold no teacher weights (the ones above did, for every configuration).
    held.clear()
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    for name in ("cached", "student"):
        memory.reset()
        runs[name].append(fns[name]())
        peaks[name] = memory.peak()
    done("peak memory without the teacher")
    steps = {
        name: {"time_s": min(r[0] for r in rs[: args.steps]), "times_s": [r[0] for r in rs],
               "peak_mb": peaks[name], "loss": rs[-1][1]}
        for name, rs in runs.items()
    }  # fmt: skip
    live, cached_r, student_r = steps["live"], steps["cached"], steps["student"]
    per_k = agreement["per_k"]
    return {
        "device": vl._device_name(args.device),
        "dtype": args.dtype,
        "preset": args.preset,
        "tokens": args.tokens,
        "batch": args.batch,
        "response_tokens": tokens,
        "chunk_tokens": args.chunk,
        "k_time": args.k_time,
        "steps": steps,
        "time_ratio_cached_vs_live": cached_r["time_s"] / live["time_s"],
        "time_ratio_cached_vs_student_only": cached_r["time_s"] / student_r["time_s"],
        "peak_mem_ratio_cached_vs_live": cached_r["peak_mb"] / live["peak_mb"],
        "peak_mem_ratio_cached_vs_student_only": cached_r["peak_mb"] / student_r["peak_mb"],
        "bytes_per_response_token": {k: v["bytes_per_response_token"] for k, v in cache.items()},
        "bytes_per_response_token_formula": {
            k: v["bytes_per_response_token_formula"] for k, v in cache.items()
        },
        "cache_write_s_per_response_token": {k: v["write_s_per_response_token"] for k, v in cache.items()},
        "match_agreement": {k: v["match_agreement"] for k, v in per_k.items()},
        "agreement": per_k,
        "live_scores": agreement["live_scores"],
    }


def print_summary(s: dict) -> None:
    print(
        f"{s['device']}, {s['dtype']}, preset {s['preset']}, {s['response_tokens']} response tokens, k {s['k_time']}"
    )
    for name, r in s["steps"].items():
        print(f"  {name:>8}: {r['time_s']:8.3f} s  peak {r['peak_mb']:9.0f} MB  loss {r['loss']:.4f}")
    print(f"  cached / live time {s['time_ratio_cached_vs_live']:.3f}, cached / student-only time "
          f"{s['time_ratio_cached_vs_student_only']:.3f}, cached / live peak memory {s['peak_mem_ratio_cached_vs_live']:.3f}")  # fmt: skip
    print(
        f"  {'k':>5} {'bytes/token':>12} {'match agree':>12} {'score err':>10} {'loss err':>9} {'ll err':>8}"
    )
    for k, a in s["agreement"].items():
        print(f"  {k:>5} {s['bytes_per_response_token'][k]:12.0f} {a['match_agreement']:12.3f} "
              f"{a['score_rel_error']:10.4f} {a['loss_rel_error']:9.4f} {a['ll_rel_error']:8.4f}")  # fmt: skip


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="default: fp32 on CPU, bf16 on CUDA"
    )
    p.add_argument("--preset", choices=list(vl.PRESETS), default=None, help="default: cpu or gpu by --device")
    p.add_argument("--tokens", type=int, default=128, help="response tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration (the fastest counts)")
    p.add_argument(
        "--k", default=",".join(map(str, KS)), help="top-k values of the agreement, comma-separated"
    )
    p.add_argument("--k-time", type=int, default=64, help="top-k of the cached step that is timed")
    p.add_argument("--draws", type=int, default=200, help="seeds whose matches are compared")
    p.add_argument("--chunk", type=int, default=None, help="chunk tokens (default: the package's default)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (preset quick)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    from vlsi.losses.chunked import DEFAULT_CHUNK_TOKENS

    args.preset = "quick" if args.quick else args.preset or ("gpu" if args.device == "cuda" else "cpu")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.k = [int(x) for x in args.k.split(",")]
    if args.quick:
        args.tokens, args.steps, args.draws = min(args.tokens, 16), 1, min(args.draws, 20)
    args.chunk = args.chunk or (8 if args.quick else DEFAULT_CHUNK_TOKENS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run(args)
    print_summary(summary)
    if args.out:
        from vlsi.train.teacher_cache import write_json_atomic

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out, summary)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
