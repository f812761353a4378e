"""VLsI step 1 (verbalization) and the inspection of what each layer says.

Training: the backbone is frozen (no gradient, eval mode, forward under ``no_grad``); each target layer's
verbalizer learns the ordinary next-token cross-entropy on response tokens from that layer's hidden state.
[paper] Because the hidden states carry no graph, the loss of layer l reaches only verbalizer l; the summed loss
is just a way to train them all in one pass. Each layer's loss is normalised by the response tokens of the whole
accumulation window across processes, as in every step (:mod:`vlsi.train.training`).

After training, the held-out split measures each layer's verbalized loss and next-token accuracy next to the
model's own output (``metrics.json``, ``verbalized_depth.png``); the paper's finding is that verbalized loss
falls with depth.

Inspection (:func:`verbalize`): each target layer in turn alone drives greedy generation through its
verbalizer, then the model answers as usual.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlsi.data.processing import ImageSize, VLProcessor
from vlsi.data.records import ChatDataset, Encoder, collate, refuse_unanswered
from vlsi.losses.chunked import chunk_tokens, chunked_unsupported
from vlsi.model.backbone import Backbone, parse_layers, target_layers
from vlsi.model.loading import load_model
from vlsi.model.verbalizer import (
    VerbalizerConfig,
    Verbalizers,
    base_model_info,
    build_verbalizers,
    response_states,
    verbalized_ce,
)
from vlsi.run.evaluate import generate_answers
from vlsi.train.engines import load_frozen, prepare_frozen, refuse_frozen_under_zero3
from vlsi.train.runtime import VerbalizedLossArgs, make_accelerator, mixed_precision
from vlsi.train.training import final_steps, prepare_run, resume, summary, train, whole_trained, write_summary

log = logging.getLogger("vlsi.train.verbalize")

# Below this depth the paper's rule (start 2, every 4) leaves one or two layers, too few to see a trend.
SHALLOW_DEPTH = 12


@dataclass(kw_only=True)
class VerbalizeSettings(VerbalizedLossArgs):
    """How to train verbalizers, without on what: ``vlsi distill`` fills in model, data, output and layers."""

    residual: bool = field(default=True, metadata={"help": "verb-FFN computes h + FFN(h) [design]"})
    zero_init: bool = field(
        default=True, metadata={"help": "zero-init the verb-FFN down projection: untrained = logit lens"}
    )
    use_norm: bool = field(
        default=True, metadata={"help": "trainable copy of the final norm before the head [design]"}
    )
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=1e-5, metadata={"help": "final learning rate of the cosine"})
    eval_data: str | None = field(
        default=None, metadata={"help": "held-out file; default: the last --eval-fraction of --data"}
    )
    eval_fraction: float = field(
        default=0.05,
        metadata={"help": "tail of --data held out (and not trained on) when --eval-data is unset"},
    )
    eval_max_records: int = field(
        default=512, metadata={"help": "measure on at most this many held-out records (0 = all)"}
    )


@dataclass(kw_only=True)
class VerbalizeConfig(VerbalizeSettings, ImageSize):
    model: str = field(metadata={"help": "checkpoint path or hub id of the (frozen) backbone"})
    data: str = field(metadata={"help": "LLaVA-format JSON/JSONL training file"})
    out: str = field(metadata={"help": "output directory: verbalizers, metrics.json, verbalized_depth.png"})
    layers: str = field(
        default="",
        metadata={
            "help": "target layers, e.g. '2,6,10'; empty = --start/--every if given, else start 2 every 4 "
            f"for models of >= {SHALLOW_DEPTH} layers and every layer but the last for shallower ones"
        },
    )
    start: int | None = field(default=None, metadata={"help": "first target layer (paper: 2)"})
    every: int | None = field(default=None, metadata={"help": "spacing of target layers (paper: 4)"})


def default_layers(num_layers: int, start: int | None = None, every: int | None = None) -> list[int]:
    """The paper's rule (start 2, every 4) for deep models or when start/every is given; else every layer but
    the last, so a shallow model still shows a depth trend and none duplicates the model's own output."""
    if start is not None or every is not None or num_layers >= SHALLOW_DEPTH:
        return target_layers(num_layers, 2 if start is None else start, 4 if every is None else every)
    return list(range(max(1, num_layers - 1)))


def resolve_layers(cfg: VerbalizeConfig, num_layers: int) -> list[int]:
    return (
        parse_layers(cfg.layers) if cfg.layers.strip() else default_layers(num_layers, cfg.start, cfg.every)
    )


def freeze(model: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    return model.eval()


class VerbalizedLoss(nn.Module):
    """Per-layer summed response CE; a module so that DDP sees the verbalizers' forward.

    ``chunk_tokens`` None is the reference loss on whole ``[N, V]`` logits; a number, the chunked one
    (:mod:`vlsi.losses.chunked`), unless the head does not allow it.
    """

    def __init__(self, verbalizers: Verbalizers, chunk_tokens: int | None = None):
        super().__init__()
        self.verbalizers = verbalizers
        self.chunk_tokens = chunk_tokens
        self._warned = False

    def forward(
        self, hidden_by_layer: dict[int, torch.Tensor], labels: torch.Tensor
    ) -> dict[int, torch.Tensor]:
        chunk = self.chunk_tokens
        # Checked per call: the engine may partition the head after this module was built (ZeRO-3).
        if chunk is not None and (reason := chunked_unsupported(self.verbalizers.lm_head)) is not None:
            if not self._warned:
                log.warning("--loss-impl chunked: %s; using the reference loss", reason)
                self._warned = True
            chunk = None
        return {
            layer: verbalized_ce(self.verbalizers, layer, h, labels, chunk)
            for layer, h in hidden_by_layer.items()
        }


@torch.no_grad()
def measure_depth(
    backbone: Backbone,
    verbalizers: Verbalizers,
    dataset: ChatDataset,
    indices: list[int],
    batch_size: int,
    pad_id: int,
    autocast=contextlib.nullcontext,
) -> dict:
    """Verbalized loss and next-token accuracy per target layer on response tokens, and the same for the
    model's own output (its final norm and head on the last layer's state, i.e. its logits)."""
    layers, last = verbalizers.layers, backbone.num_layers - 1
    device = backbone.lm_head.weight.device
    loss_sum = dict.fromkeys([*layers, "final"], 0.0)
    correct = dict.fromkeys([*layers, "final"], 0)
    tokens, records = 0, 0
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start : start + batch_size]], pad_id)
        if batch is None:
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            hidden = backbone.layer_states(sorted({*layers, last}), batch)
            for key in [*layers, "final"]:
                states, target = response_states(hidden[last if key == "final" else key], batch["labels"])
                if key == "final":
                    logits = backbone.output_logits(states).float()  # [N, V]
                else:
                    logits = verbalizers.logits(key, states).float()  # [N, V]
                loss_sum[key] += F.cross_entropy(logits, target, reduction="sum").item()
                correct[key] += int((logits.argmax(-1) == target).sum())
        tokens += int(target.numel())  # the same response positions for every layer
        records += batch["input_ids"].shape[0]
    n = max(1, tokens)
    return {
        "layers": layers,
        "loss": [loss_sum[layer] / n for layer in layers],
        "accuracy": [correct[layer] / n for layer in layers],
        "final_layer": {"layer": last, "loss": loss_sum["final"] / n, "accuracy": correct["final"] / n},
        "num_layers": backbone.num_layers,
        "tokens": tokens,
        "records": records,
    }


def plot_depth(metrics: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    final = metrics["final_layer"]
    for ax, key, name in ((axes[0], "loss", "verbalized loss"), (axes[1], "accuracy", "next-token accuracy")):
        ax.plot(metrics["layers"], metrics[key], "o-", label="verbalizer")
        ax.plot([final["layer"]], [final[key]], "r*", markersize=12, label="model output")
        ax.set_xlabel("layer")
        ax.set_ylabel(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].set_ylim(0, 1)
    axes[0].legend()
    fig.suptitle(f"held-out response tokens: {metrics['tokens']}")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _splits(cfg: VerbalizeConfig, encoder: Encoder) -> tuple[ChatDataset, int, ChatDataset, list[int]]:
    """(train set, how many of its leading records to train on, held-out set, held-out indices)."""
    train = ChatDataset(cfg.data, encoder, cfg.image_root)
    refuse_unanswered(cfg.data, train.records, "vlsi verbalize-train (step 1)")
    if cfg.eval_data:
        held = ChatDataset(cfg.eval_data, encoder, cfg.image_root)
        n_train, held_idx = len(train), list(range(len(held)))
    else:
        if not 0 < cfg.eval_fraction < 1:
            raise ValueError(
                f"--eval-fraction must be in (0, 1) without --eval-data, got {cfg.eval_fraction}"
            )
        # The tail, not a random draw: the split is the same for every seed and every resume.
        n_train = len(train) - max(1, math.ceil(len(train) * cfg.eval_fraction))
        held, held_idx = train, list(range(n_train, len(train)))
    if cfg.eval_max_records:
        held_idx = held_idx[: cfg.eval_max_records]
    return train, n_train, held, held_idx


def _frozen_model(cfg: VerbalizeConfig, accelerator, model: nn.Module | None) -> nn.Module:
    if model is None:
        # A frozen backbone needs no fp32 master weights; bf16 halves its memory.
        dtype = torch.bfloat16 if mixed_precision(cfg.precision) == "bf16" else torch.float32
        # Under FSDP2 built sharded: no process holds the whole model (engines.load_frozen_sharded).
        model = load_frozen(accelerator, cfg.model, dtype)
    return freeze(model)


def train_verbalizers(cfg: VerbalizeConfig, model: nn.Module | None = None) -> dict:
    """Trains one verbalizer per target layer of the frozen ``model`` (loaded from ``cfg.model`` if not
    given) and writes them, their held-out metrics and the depth plot to ``cfg.out``."""
    accelerator = make_accelerator(cfg.precision, cfg.seed)
    refuse_frozen_under_zero3(accelerator, "step 1 (the frozen backbone)")
    cfg = cfg.on_device(accelerator.device)
    chunk = chunk_tokens(cfg.loss_impl, cfg.loss_chunk_tokens)
    processor = VLProcessor.from_pretrained(cfg.model, **cfg.pixel_bounds())
    model = _frozen_model(cfg, accelerator, model)
    backbone = Backbone(model)
    layers = resolve_layers(cfg, backbone.num_layers)
    verbalizers = build_verbalizers(
        backbone,
        layers,
        VerbalizerConfig(residual=cfg.residual, zero_init=cfg.zero_init, use_norm=cfg.use_norm),
    )
    n_verb, n_model = verbalizers.num_parameters(), sum(p.numel() for p in model.parameters())
    accelerator.print(
        f"verbalizers: {n_verb:,} parameters on layers {layers} ({n_verb / len(layers):,.0f} per layer); "
        f"frozen backbone: {n_model:,} parameters, {backbone.num_layers} layers"
    )

    dataset, n_train, held, held_idx = _splits(cfg, Encoder(processor, cfg.max_length))
    run = prepare_run(accelerator, cfg, VerbalizedLoss(verbalizers, chunk), dataset, n_train)
    # Placed after the verbalizers copied its final norm (whole) and after DeepSpeed's config was completed;
    # sharded like step 2's teacher under FSDP2, moved whole to the device otherwise (ZeRO-3 was refused).
    backbone.model = prepare_frozen(accelerator, model, backbone.layers)
    resume(run, ignore=("eval_max_records",), target_layers=layers)

    def micro_loss(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            hidden = backbone.layer_states(layers, batch)
        per_layer = run.module(hidden, batch["labels"])
        return sum(per_layer.values()), torch.tensor([per_layer[layer].item() for layer in layers])

    def layer_means(recent: list) -> list[float]:
        return torch.tensor(recent).mean(0).tolist()

    train(
        run,
        "verbalize",
        micro_loss,
        entry=lambda means: means,
        row=lambda recent: {"loss": dict(zip(map(str, layers), layer_means(recent), strict=True))},
        pad_id=processor.pad_token_id,
    )

    final = final_steps(run)
    result = summary(
        run,
        n_train,
        target_layers=layers,
        final_loss=layer_means(final) if final else None,
        verbalizer_parameters=n_verb,
        backbone_parameters=n_model,
    )
    # Every process measures (the same records): a sharded backbone's forward is a collective. The
    # verbalizers are whole inside, also under FSDP2 / ZeRO-3.
    with whole_trained(run) as trained:
        verbalizers = trained.verbalizers.eval()
        result["held_out"] = measure_depth(
            backbone,
            verbalizers,
            held,
            held_idx,
            cfg.batch_size,
            processor.pad_token_id,
            accelerator.autocast,
        )
        if accelerator.is_main_process:
            _save(run.out, backbone, verbalizers, result)
    return result


def _save(out: Path, backbone: Backbone, verbalizers: Verbalizers, summary: dict) -> None:
    """The verbalizers, their held-out metrics and depth plot, and the summary."""
    verbalizers.save(out, base_model_info(backbone))
    (out / "metrics.json").write_text(json.dumps(summary["held_out"], indent=2))
    plot_depth(summary["held_out"], out / "verbalized_depth.png")
    write_summary(out, summary)


# --- inspection -------------------------------------------------------------------------------------------


@dataclass
class InspectConfig:
    model: str = field(metadata={"help": "checkpoint path of the model the verbalizers were trained on"})
    verbalizers: str = field(metadata={"help": "directory written by 'vlsi verbalize-train'"})
    question: str = field(metadata={"help": "the question about the image"})
    image: str | None = field(default=None, metadata={"help": "image file (omit for a text-only prompt)"})
    max_new_tokens: int = field(default=32, metadata={"help": "generation budget per layer"})
    max_length: int = field(default=2048, metadata={"help": "longest prompt accepted, in tokens"})
    json: bool = field(
        default=False, metadata={"help": "print a JSON list of {label, text} instead of lines"}
    )


def prompt_record(question: str, image: str | None) -> dict:
    """A one-turn LLaVA record; the reply is a stand-in, since records must end in a non-empty reply and
    :meth:`Encoder.encode_prompt` drops it."""
    record = {
        "id": "verbalize",
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "?"}],
    }
    if image is not None:
        record["image"] = str(Path(image).resolve())
    return record


@torch.no_grad()
def greedy_from_layer(backbone: Backbone, read, layer: int, prompt: dict, eos_id: int, max_new_tokens: int):
    """Greedy tokens where ``read`` (hidden [B, D] -> logits [B, V]) of ``layer``'s last state picks each one.

    No KV cache: the whole sequence is re-run per token, which keeps this independent of each family's
    cache and rotary-position bookkeeping; it is an inspection tool, not a decoder.
    """
    device = backbone.lm_head.weight.device
    batch = {k: v.to(device) for k, v in collate([dict(prompt)], pad_id=0).items()}
    new: list[int] = []
    for _ in range(max_new_tokens):
        hidden = backbone.layer_states([layer], batch)
        token = int(read(hidden[layer][:, -1]).argmax(-1))
        if token == eos_id:
            break
        new.append(token)
        grow = torch.tensor([[token]], device=device)
        batch["input_ids"] = torch.cat([batch["input_ids"], grow], dim=1)
        batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(grow)], dim=1)
        if "mm_token_type_ids" in batch:
            batch["mm_token_type_ids"] = torch.cat(
                [batch["mm_token_type_ids"], torch.zeros_like(grow)], dim=1
            )
    return new


def verbalize(
    model: str | Path | nn.Module,
    verbalizers_dir: str | Path,
    image: str | None,
    question: str,
    max_new_tokens: int = 32,
    processor: VLProcessor | None = None,
    max_length: int = 2048,
) -> list[tuple[str, str]]:
    """``[("layer 2", text), ..., ("final", text)]``: what each target layer says when it alone drives greedy
    generation through its verbalizer, then the model's own greedy answer."""
    if isinstance(model, (str, Path)):
        processor = processor or VLProcessor.from_pretrained(model)
        model = load_model(model, dtype=torch.float32)
    elif processor is None:
        processor = VLProcessor.from_pretrained(model.config._name_or_path)
    backbone = Backbone(freeze(model))
    verbalizers = Verbalizers.load(verbalizers_dir, backbone).eval()
    prompt, _ = Encoder(processor, max_length).encode_prompt(prompt_record(question, image), Path.cwd())
    eos_id, decode = processor.tokenizer.eos_token_id, processor.tokenizer.decode
    lines = []
    for layer in verbalizers.layers:

        def read(h, layer=layer):
            return verbalizers.logits(layer, h)

        tokens = greedy_from_layer(backbone, read, layer, prompt, eos_id, max_new_tokens)
        lines.append((f"layer {layer}", decode(tokens, skip_special_tokens=True).strip()))
    answer = generate_answers(model, processor, [dict(prompt)], max_new_tokens)[0]
    lines.append(("final", answer.strip()))
    return lines


def format_verbalized(lines: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in lines)
    return "\n".join(f"{label:>{width}}: {' '.join(text.split())}" for label, text in lines)
