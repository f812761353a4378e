"""``vlsi plan RECIPE``: what a distillation recipe holds and costs, read from the model configs alone.

No weights are read: each model is built on the meta device from its ``config.json`` (a local checkpoint
folder, else the copy bundled with the package under ``vlsi/configs/models/<org>--<name>/``, else the hub;
the repository's ``configs/models`` and ``configs/recipes`` link to the bundled folders), so the 72B teachers
plan in seconds on a laptop. The plan shows the target layers, the parameters of the backbones, their
verbalizers and LoRA adapters, whether the two vocabularies are comparable, and an estimate of the memory
each step needs per GPU under the chosen engine and GPU count (:func:`vlsi.run.memory.estimate_memory` states the formula).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlsi.losses.chunked import GPU_CHUNK_TOKENS
from vlsi.model.backbone import MEDIA_TOKEN_KEYS, Backbone, get_module, parse_layers
from vlsi.run.config import build_config, read_config_file
from vlsi.run.memory import GIB, ModelSummary, estimate_memory, lora_parameters, verbalizer_parameters

__all__ = [
    "BUNDLED_MODELS",
    "BUNDLED_RECIPES",
    "ENGINES",
    "ModelSummary",
    "PlanConfig",
    "block_centres",
    "check_pair",
    "complete_recipe",
    "find_recipe",
    "load_recipe",
    "make_plan",
    "meta_model",
    "resolve_config",
    "summarize",
]

# Package data (pyproject's package-data), so an installed vlsi finds them wherever it was installed.
BUNDLED_MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
BUNDLED_RECIPES = BUNDLED_MODELS.parent / "recipes"
ENGINES = ("ddp", "fsdp", "zero3")


@dataclass
class PlanConfig:
    recipe: str = field(
        metadata={
            "help": "distill recipe YAML, e.g. configs/recipes/qwen2vl-72b-to-7b.yaml, or the name of a "
            "bundled recipe, e.g. qwen2vl-72b-to-7b",
            "positional": True,
        }
    )
    engine: str = field(
        default="ddp",
        metadata={
            "help": "ddp (everything replicated) | fsdp | zero3 (weights and states sharded over --gpus)"
        },
    )
    gpus: int = field(default=8, metadata={"help": "GPUs the run is spread over (paper: 8 x A100 80GB)"})
    seq_len: int | None = field(
        default=None, metadata={"help": "tokens per sequence (default: each step's max_length in the recipe)"}
    )
    gpu_memory: float = field(
        default=80.0, metadata={"help": "GiB per GPU; steps estimated above it are marked"}
    )


# ----------------------------------------------------------------------------------------------- models


def bundled_config_dir(name: str) -> Path | None:
    """The bundled ``configs/models/<org>--<name>`` folder for a hub id, if there is one."""
    folder = BUNDLED_MODELS / name.replace("/", "--")
    return folder if (folder / "config.json").is_file() else None


def resolve_config(name: str):
    """``(config, where it came from)`` for a local checkpoint, a bundled hub id, or (online) the hub."""
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path)), str(path)
    bundled = bundled_config_dir(name)
    if bundled is not None:
        where = f"bundled {bundled.relative_to(BUNDLED_MODELS.parent.parent)}"
        return AutoConfig.from_pretrained(str(bundled)), where
    try:
        return AutoConfig.from_pretrained(name), "hub"
    except OSError as e:
        raise ValueError(
            f"{name!r}: not a checkpoint folder, not bundled under {BUNDLED_MODELS}, and the hub did not answer: {e}"
        ) from None


def meta_model(config) -> nn.Module:
    """The model of ``config`` with every tensor on the meta device: shapes only, no memory, no init."""
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _count(params) -> int:
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen:  # tied embeddings count once
            seen.add(id(p))
            total += p.numel()
    return total


def _moe(model: nn.Module, text_config) -> tuple[int, int] | None:
    """``(parameters a token meets, MLP width a token goes through)`` of a mixture of experts, or None.

    Each MoE layer routes a token to ``num_experts_per_tok`` of its ``num_experts`` experts, so of the expert
    weights (the fused expert tensors) only that share is active; its MLP is that many experts wide."""
    experts, per_token = (
        getattr(text_config, "num_experts", None),
        getattr(text_config, "num_experts_per_tok", None),
    )
    if not experts or not per_token:
        return None
    expert_params = _count(
        p for m in model.modules() if type(m).__name__.endswith("Experts") for p in m.parameters()
    )
    active = _count(model.parameters()) - expert_params + expert_params * per_token // experts
    return active, per_token * int(text_config.moe_intermediate_size)


def summarize(name: str) -> ModelSummary:
    config, source = resolve_config(name)
    model = meta_model(config)
    backbone = Backbone(model)
    family = backbone.family
    language_model = get_module(model, family.decoder_layers.rsplit(".", 1)[0])
    language = _count([*language_model.parameters(), *backbone.lm_head.parameters()])
    moe = _moe(model, backbone.text_config)
    return ModelSummary(
        name=name,
        source=source,
        config=config,
        model=model,
        family=family.name,
        num_layers=backbone.num_layers,
        hidden_size=backbone.hidden_size,
        # A token's MLP activations: its routed experts' width in a mixture of experts.
        intermediate_size=moe[1] if moe else int(backbone.text_config.intermediate_size),
        head_width=backbone.vocab_size,
        total=_count(model.parameters()),
        language=language,
        largest_layer=max(_count(layer.parameters()) for layer in backbone.layers),
        active=moe[0] if moe else None,
        decoder=_count(backbone.layers.parameters()),
    )


def block_centres(num_layers: int, count: int) -> list[int]:
    """``count`` layers at the (floored) centres of equal blocks of the stack.

    The one rule behind every list the paper gives: Qwen2-VL 28 layers / 7 -> 2, 6, ..., 26 and 80 / 20 ->
    2, 6, ..., 78; LLaVA-OV 24 / 3 -> 4, 12, 20 and 80 / 4 -> 10, 30, 50, 70.
    """
    if not 0 < count <= num_layers:
        raise ValueError(f"need 0 < count <= num_layers, got {count} of {num_layers}")
    return [(2 * k + 1) * num_layers // (2 * count) for k in range(count)]


# ------------------------------------------------------------------------------------------- vocabulary

# Config entries that name token ids; two models of one tokenizer agree on every one both define.
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", *MEDIA_TOKEN_KEYS)


def _token_ids(config) -> dict[str, object]:
    ids = {}
    for source in (config.get_text_config(), config):
        for key in _TOKEN_ID_KEYS:
            value = getattr(source, key, None)
            if value is not None:
                ids[key] = value
    return ids


def _tokenizer_dir(name: str) -> Path | None:
    path = Path(name).expanduser()
    has = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return path if has else None


def check_pair(teacher: ModelSummary, student: ModelSummary) -> list[str]:
    """Refuses a pair whose vocabularies are not the same tokenizer; returns notes on what is allowed.

    From the configs: one model family (so one tokenizer family and token-index order) and the same special
    token ids. Head widths may differ by padding rows (Qwen2-VL 72B / 7B: 152,064 vs 2B: 151,936); logits
    are then compared on the shared width. Where both models are local checkpoints with tokenizer files,
    :func:`vlsi.model.loading.check_same_tokenizer` also compares the tokenizers id by id.
    """
    if teacher.family != student.family:
        return _cross_family_notes(teacher, student)
    t_ids, s_ids = _token_ids(teacher.config), _token_ids(student.config)
    differing = {k: (t_ids[k], s_ids[k]) for k in t_ids.keys() & s_ids.keys() if t_ids[k] != s_ids[k]}
    if differing:
        shown = ", ".join(f"{k} {t} vs {s}" for k, (t, s) in sorted(differing.items()))
        raise ValueError(
            f"teacher and student configs disagree on special token ids ({shown}): not one tokenizer"
        )
    notes = []
    shared = min(teacher.head_width, student.head_width)
    if teacher.head_width != student.head_width:
        wider = "teacher" if teacher.head_width > student.head_width else "student"
        notes.append(
            f"heads {teacher.head_width:,} (teacher) vs {student.head_width:,} (student): the {wider}'s "
            f"{abs(teacher.head_width - student.head_width)} extra rows are padding; compared on the shared "
            f"{shared:,}"
        )
    else:
        notes.append(f"heads of one width ({shared:,})")
    t_dir, s_dir = _tokenizer_dir(teacher.name), _tokenizer_dir(student.name)
    if t_dir and s_dir:
        from transformers import AutoTokenizer

        from vlsi.model.loading import check_same_tokenizer

        t_tok, s_tok = AutoTokenizer.from_pretrained(str(t_dir)), AutoTokenizer.from_pretrained(str(s_dir))
        size = check_same_tokenizer(t_tok, s_tok)
        if max(len(t_tok), len(s_tok)) > shared:
            raise ValueError(
                f"a tokenizer has {max(len(t_tok), len(s_tok))} tokens, more than the head's {shared}"
            )
        notes.append(f"tokenizers compared id by id: the same on all {size:,} shared ids")
    else:
        notes.append(f"one family ({teacher.family}) and the same special token ids in both configs")
    return notes


def _cross_family_notes(teacher: ModelSummary, student: ModelSummary) -> list[str]:
    """Two families: their special tokens and ids may differ; every regular token must agree
    (:func:`vlsi.losses.vocab.check_regular_vocab`), which needs the tokenizers themselves."""
    notes = [
        f"two families ({teacher.family} teacher, {student.family} student): each renders a record with its own "
        "template; compared on the token ids both tokenizers spell alike, each record's response checked"
    ]
    t_dir, s_dir = _tokenizer_dir(teacher.name), _tokenizer_dir(student.name)
    if t_dir and s_dir:
        from transformers import AutoTokenizer

        from vlsi.losses.vocab import check_regular_vocab, compared_ids

        t_tok, s_tok = AutoTokenizer.from_pretrained(str(t_dir)), AutoTokenizer.from_pretrained(str(s_dir))
        size = check_regular_vocab(t_tok, s_tok)
        keep = compared_ids(t_tok, s_tok)
        compared = len(t_tok) if keep is None else len(keep)
        notes.append(f"tokenizers: the same {size:,} regular tokens; {compared:,} ids compared")
    else:
        notes.append(
            "regular vocabularies compared from the tokenizer files when the run starts, before any weight "
            "is loaded"
        )
    return notes


# ---------------------------------------------------------------------------------------------- recipe


def find_recipe(name: str | Path) -> Path:
    """A recipe file, or for a bare name (no folder) that is not a file here, the bundled recipe of that
    name (``qwen2vl-72b-to-7b`` or ``qwen2vl-72b-to-7b.yaml``)."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.parent == Path("."):
        bundled = BUNDLED_RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
        if bundled.is_file():
            return bundled
    names = ", ".join(sorted(p.stem for p in BUNDLED_RECIPES.glob("*.yaml")))
    raise ValueError(f"{str(name)!r} is neither a recipe file nor the name of a bundled recipe ({names})")


def load_recipe(path: str | Path) -> dict:
    """The recipe file (or bundled recipe, :func:`find_recipe`) as a dict, read by :func:`complete_recipe`."""
    path = find_recipe(path)
    return complete_recipe(read_config_file(path), str(path))


def complete_recipe(recipe: dict, where: str = "recipe") -> dict:
    """The recipe read exactly as ``vlsi distill --config`` reads it (:class:`vlsi.run.distill.DistillConfig`),
    back as a dict whose step sections hold every field with its default filled in.

    Unknown keys, at the top or in a step section, are refused, so a typo is caught before any weight is read.
    """
    from vlsi.run.distill import DistillConfig

    if not isinstance(recipe, dict):
        raise ValueError(f"{where}: expected a mapping of option names to values")
    try:
        cfg = build_config(DistillConfig, argparse.Namespace(), recipe)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    for key in ("teacher", "student", "teacher_layers", "student_layers"):
        if not getattr(cfg, key):
            raise ValueError(f"{where}: missing '{key}'")
    return dataclasses.asdict(cfg)


# ------------------------------------------------------------------------------------------------ plan


def _m(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _layer_list(layers: list[int]) -> str:
    return ",".join(map(str, layers))


def make_plan(cfg: PlanConfig) -> str:
    """The plan as printable text; raises ValueError for a recipe that cannot run as written."""
    if cfg.engine not in ENGINES:
        raise ValueError(f"--engine {cfg.engine!r} is not one of {', '.join(ENGINES)}")
    if cfg.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {cfg.gpus}")
    recipe_file = find_recipe(cfg.recipe)
    recipe = load_recipe(recipe_file)
    for step in ("verbalize", "interact"):  # a plan is for GPUs: the chunk a GPU run takes by default
        recipe[step]["loss_chunk_tokens"] = recipe[step]["loss_chunk_tokens"] or GPU_CHUNK_TOKENS
    teacher, student = summarize(recipe["teacher"]), summarize(recipe["student"])
    vocab_notes = check_pair(teacher, student)  # before anything else: a mismatch is refused outright
    t_layers, s_layers = parse_layers(recipe["teacher_layers"]), parse_layers(recipe["student_layers"])
    _check_layers(teacher, t_layers, student, s_layers)
    n_params = {
        "teacher_verbalizers": verbalizer_parameters(teacher.backbone, t_layers),
        "student_verbalizers": verbalizer_parameters(student.backbone, s_layers),
    }

    out = [f"recipe  {cfg.recipe}"]
    if recipe_file != Path(cfg.recipe).expanduser():
        out[0] += f"  (bundled {recipe_file.relative_to(BUNDLED_MODELS.parent.parent)})"
    out += _model_lines(teacher, student)
    out.append("target layers")
    out.append(f"  teacher {len(t_layers):>2}: {_layer_list(t_layers)}")
    out.append(f"  student {len(s_layers):>2}: {_layer_list(s_layers)}")
    out.append("verbalizers (verb-FFN 3 x hidden^2 + a norm copy per layer)")
    for role, layers in (("teacher", t_layers), ("student", s_layers)):
        n = n_params[f"{role}_verbalizers"]
        out.append(f"  {role} {len(layers):>2} x {_m(n / len(layers)):>7} = {_m(n):>8}  ({n:,})")
    out.append("vocabulary")
    out.extend(f"  {note}" for note in vocab_notes)
    out.append("student trained in " + "; ".join(_trained(recipe, student, n_params)))
    rows = estimate_memory(teacher, student, recipe, cfg.engine, cfg.gpus, cfg.seq_len, n_params)
    out += _memory_lines(cfg, recipe, rows)
    return "\n".join(out)


def _check_layers(
    teacher: ModelSummary, t_layers: list[int], student: ModelSummary, s_layers: list[int]
) -> None:
    for role, m, layers in (("teacher", teacher, t_layers), ("student", student, s_layers)):
        if max(layers) >= m.num_layers:
            raise ValueError(f"{role}_layers {layers} go beyond {m.name}'s {m.num_layers} layers (0-based)")
    if len(s_layers) > len(t_layers):
        raise ValueError(
            f"{len(s_layers)} student target layers but {len(t_layers)} teacher layers: matching needs t_s <= t_l"
        )


def _model_lines(teacher: ModelSummary, student: ModelSummary) -> list[str]:
    out = [f"{'':8}{'model':<44}{'layers':>7}{'hidden':>8}{'head':>9}{'vision':>9}{'LM':>9}{'total':>9}"]
    for role, m in (("teacher", teacher), ("student", student)):
        out.append(
            f"{role:<8}{m.name:<44}{m.num_layers:>7}{m.hidden_size:>8}{m.head_width:>9,}"
            f"{_m(m.vision):>9}{_m(m.language):>9}{_m(m.total):>9}"
        )
        if m.active is not None:
            out.append(f"{'':8}  mixture of experts: {_m(m.active)} active of {_m(m.total)} per token")
        out.append(f"{'':8}  config: {m.source}")
    return out


def _trained(recipe: dict, student: ModelSummary, n_params: dict) -> list[str]:
    """What steps 2 and 3 train of the student; counts the LoRA parameters into ``n_params``."""
    trained = []
    for step in ("interact", "sft"):
        s = recipe[step]
        if not s.get("lora"):
            trained.append(f"{step}: whole")
            continue
        key = ("lora", s["lora_rank"])
        n_params[key] = n_params.get(key) or lora_parameters(student.model, s["lora_rank"])
        trained.append(f"{step}: LoRA r{s['lora_rank']} ({_m(n_params[key])})")
    return trained


def _memory_lines(cfg: PlanConfig, recipe: dict, rows: dict) -> list[str]:
    out = [
        f"memory per GPU (GiB), {cfg.engine} on {cfg.gpus} GPU{'s' if cfg.gpus > 1 else ''}, "
        f"bf16 autocast, every token a response token",
        f"  {'step':<22}{'batch':>6}{'seq':>6}{'weights':>9}{'grad+opt':>9}{'activ':>8}{'heads':>8}{'total':>8}",
    ]
    for name, (mem, batch, length) in rows.items():
        if cfg.engine == "zero3" and name[0] in "12":
            # vlsi.train.engines.refuse_frozen_under_zero3: these steps hold a frozen model.
            out.append(f"  {name:<22}{batch:>6}{length:>6}  refused under zero3 (a frozen model): use fsdp")
            continue
        flag = "  > --gpu-memory" if mem.total / GIB > cfg.gpu_memory else ""
        out.append(
            f"  {name:<22}{batch:>6}{length:>6}{mem.weights / GIB:>9.1f}{mem.states / GIB:>9.1f}"
            f"{mem.activations / GIB:>8.1f}{mem.heads / GIB:>8.1f}{mem.total / GIB:>8.1f}{flag}"
        )

    def impl(step: str) -> str:
        if recipe[step]["loss_impl"] == "chunked" and cfg.engine != "zero3":
            return f"chunked ({recipe[step]['loss_chunk_tokens']})"
        return "reference" + (" (zero3 partitions the head)" if cfg.engine == "zero3" else "")

    out.append(f"  verbalized losses: verbalize {impl('verbalize')}, interact {impl('interact')}")
    ckpt = {step: "on" if recipe[step]["gradient_checkpointing"] else "off" for step in ("interact", "sft")}
    out.append(f"  gradient checkpointing: interact {ckpt['interact']}, sft {ckpt['sft']}")
    if cfg.engine == "zero3":
        out.append(
            "  zero3 holds no frozen model (loaded whole, then moved whole onto one GPU before partitioning): "
            "steps 1 and 2 are refused; step 2 runs under zero3 only with a teacher cache built under fsdp"
        )
    if cfg.engine == "zero3" and any(
        recipe[step]["grad_accum"] != 1 for step in ("verbalize", "interact", "sft")
    ):
        out.append(
            "  zero3 runs need grad_accum 1 in every step (raise batch_size instead): this recipe is refused"
        )
    if cfg.engine == "fsdp":
        out.append(
            "  frozen models (steps 1 and 2): decoder layers and the teacher's verbalizers sharded, embeddings, head "
            "and vision tower whole on every GPU, as vlsi.train.engines.prepare_frozen places them"
        )
    out.append("  not counted: vision activations, CUDA context and allocator slack (1-3 GiB)")
    return out


def run_plan(cfg: PlanConfig) -> None:
    print(make_plan(cfg))
