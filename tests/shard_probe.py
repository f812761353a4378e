"""Under ``torchrun`` (gloo on CPU): the frozen teacher sharded as under FSDP2 reads the same as the whole one.

``python -m torch.distributed.run --nproc_per_node 2 shard_probe.py TEACHER VERBALIZERS DATA RESULT.json``
loads the teacher twice, whole and through :func:`vlsi.train.engines.shard_frozen_layers`, runs both on the same
batch under ``no_grad`` and has rank 0 write ``{"max_diff", "layer_shard_fraction", "head_whole",
"export_diff", "sharded_after_export"}``: how far apart every verbalizer's and the final layer's logits are,
what share of a decoder layer's weights a process still holds after the forward, whether the language head
stayed an ordinary (unsharded) parameter, how far a state dict taken inside :func:`vlsi.train.engines.whole_weights`
is from the whole model's, and whether the layers are sharded again afterwards; then the same of the
teacher built sharded from its checkpoint (:func:`vlsi.train.engines.load_frozen_sharded`): ``loaded_*``, and
of a copy whose head is tied to its embedding: ``tied_export_diff``.

With ``STUDENT STUDENT_VERBALIZERS`` after ``RESULT.json`` it also writes ``{"loss_whole", "loss_sharded"}``:
step 2's loss (uniform matching, every term) of that student against the whole teacher, as one process
computes it, and against the sharded one.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from vlsi.data.processing import VLProcessor
from vlsi.data.records import ChatDataset, Encoder, collate
from vlsi.model.backbone import Backbone
from vlsi.model.loading import load_model
from vlsi.model.verbalizer import Verbalizers
from vlsi.train.engines import (
    NeedsConversion,
    load_frozen_sharded,
    load_frozen_verbalizers_sharded,
    shard_frozen_layers,
    whole_weights,
)


@torch.no_grad()
def read_all(backbone: Backbone, verbalizers: Verbalizers, batch: dict) -> dict:
    last = backbone.num_layers - 1
    hidden = backbone.layer_states(sorted({*verbalizers.layers, last}), batch)
    logits = {layer: verbalizers.logits(layer, hidden[layer]) for layer in verbalizers.layers}
    logits["final"] = backbone.output_logits(hidden[last])
    return logits


def step2_loss(teacher: Backbone, teacher_verbalizers: Verbalizers, student, batch: dict) -> float:
    from vlsi.train.interact import Reader, teacher_response_states

    states = teacher_response_states(teacher, teacher_verbalizers.layers, batch)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        loss, _, _ = student(
            batch, states, Reader(teacher, teacher_verbalizers), teacher_verbalizers.layers, generator
        )
    return loss.item()


def load_student(path: str, verbalizers: str):
    from vlsi.train.interact import InteractConfig, InteractingStudent

    model = load_model(path, dtype=torch.float32).eval()
    cfg = InteractConfig(student=path, student_verbalizers=verbalizers, data="", out="", strategy="uniform")
    return InteractingStudent(model, Verbalizers.load(verbalizers, Backbone(model)), cfg)


def _tied_head_loads_the_same(source: str, copy: Path, accelerator) -> float | None:
    """A copy of ``source`` whose head is tied to its embedding (as Qwen2-VL-2B's is; the checkpoint has no
    ``lm_head.weight``), built sharded: how far its weights are from ``from_pretrained``'s (rank 0)."""
    if dist.get_rank() == 0:
        shutil.copytree(source, copy)
        config = json.loads((copy / "config.json").read_text())
        config["tie_word_embeddings"] = config.setdefault("text_config", {})["tie_word_embeddings"] = True
        (copy / "config.json").write_text(json.dumps(config))
        weights = load_file(str(copy / "model.safetensors"))
        del weights["lm_head.weight"]
        save_file(weights, str(copy / "model.safetensors"), metadata={"format": "pt"})
    dist.barrier()
    whole = load_model(copy, dtype=torch.float32).state_dict()
    loaded = load_frozen_sharded(str(copy), torch.float32, torch.device("cpu"))
    assert loaded.lm_head.weight is Backbone(loaded).embed_tokens.weight
    with whole_weights(accelerator, loaded):
        state = loaded.state_dict()
        return max((state[k] - v).abs().max().item() for k, v in whole.items())


def main(
    teacher: str, verbalizers: str, data: str, result: str, student: str = "", student_verbalizers: str = ""
) -> None:
    dist.init_process_group("gloo")
    processor = VLProcessor.from_pretrained(teacher)
    dataset = ChatDataset(data, Encoder(processor, 2048))
    batch = collate([dataset[i] for i in range(3)], processor.pad_token_id)

    whole = Backbone(load_model(teacher, dtype=torch.float32).eval().requires_grad_(False))
    want = read_all(whole, Verbalizers.load(verbalizers, whole), batch)

    model = load_model(teacher, dtype=torch.float32).eval().requires_grad_(False)
    shard_frozen_layers(model, Backbone(model).layers)
    sharded = Backbone(model)
    sharded_verbalizers = Verbalizers.load(verbalizers, sharded)
    got = read_all(sharded, sharded_verbalizers, batch)

    layer = list(sharded.layers[0].parameters())
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in layer)
    out = {
        "max_diff": max((got[k] - want[k]).abs().max().item() for k in want),
        "layer_shard_fraction": held / sum(p.numel() for p in layer),
        "head_whole": type(sharded.lm_head.weight) is torch.nn.Parameter,
    }
    # What an export of a sharded run reads; accelerate runs FSDP only on GPUs, so its two answers are given.
    accelerator = SimpleNamespace(distributed_type="FSDP", is_main_process=dist.get_rank() == 0)
    whole_state = whole.model.state_dict()
    with whole_weights(accelerator, model):
        if dist.get_rank() == 0:
            exported = {k: v.clone() for k, v in model.state_dict().items()}
            out["export_diff"] = max((exported[k] - v).abs().max().item() for k, v in whole_state.items())
    out["sharded_after_export"] = all(hasattr(p, "to_local") for p in sharded.layers[0].parameters())

    try:
        loaded_directly = load_frozen_sharded(teacher, torch.float32, torch.device("cpu"))
    except NeedsConversion as e:  # fused experts: engines.load_frozen loads whole, then shards
        loaded_directly, out["loaded_skipped"] = None, str(e)
    if loaded_directly is not None:
        # Built sharded from the checkpoint, never whole (engines.load_frozen_sharded), its verbalizers too
        # (engines.load_frozen_verbalizers_sharded): the same weights and logits.
        loaded = loaded_directly.eval().requires_grad_(False)
        read = Backbone(loaded)
        got = read_all(
            read,
            load_frozen_verbalizers_sharded(verbalizers, read, torch.float32, torch.device("cpu")),
            batch,
        )
        out["loaded_max_diff"] = max((got[k] - want[k]).abs().max().item() for k in want)
        out["loaded_shard_fraction"] = sum(p.to_local().numel() for p in read.layers[0].parameters()) / sum(
            p.numel() for p in read.layers[0].parameters()
        )
        with whole_weights(accelerator, loaded):
            if dist.get_rank() == 0:
                state = loaded.state_dict()
                out["loaded_export_diff"] = max(
                    (state[k] - v).abs().max().item() for k, v in whole_state.items()
                )
                out["loaded_buffers_equal"] = all(
                    torch.equal(b, dict(whole.model.named_buffers())[k]) for k, b in loaded.named_buffers()
                )
        out["tied_export_diff"] = _tied_head_loads_the_same(
            teacher, Path(result).with_name("tied"), accelerator
        )
    if student:
        learner = load_student(student, student_verbalizers)
        out["loss_whole"] = step2_loss(whole, Verbalizers.load(verbalizers, whole), learner, batch)
        out["loss_sharded"] = step2_loss(sharded, sharded_verbalizers, learner, batch)
    if dist.get_rank() == 0:
        with open(result, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:7])
