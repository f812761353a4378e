"""Under ``torchrun`` (gloo on CPU): on-policy generation when the student is sharded as under FSDP2.

``python -m torch.distributed.run --nproc_per_node 2 generation_probe.py STUDENT DATA RESULT_PREFIX`` shards a
student whose weights were moved off its checkpoint (so a copy that missed them would show it) with
``fully_shard`` per decoder layer and at the root, as accelerate's FSDP2 does; syncs a
:class:`vlsi.train.on_policy.GenerationCopy` loaded from the checkpoint; and has each rank generate greedy answers
for prompts of its own (of other lengths on each rank, so the generations end at different steps) with the copy
and with the whole moved model. Each rank writes ``RESULT_PREFIX.RANK.json``: ``{"answers_equal",
"copy_diff", "still_sharded", "answers"}``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from vlsi.data.processing import VLProcessor
from vlsi.data.records import Encoder, load_records
from vlsi.model.backbone import Backbone
from vlsi.model.loading import load_model
from vlsi.train.on_policy import GenerationCopy, generate_tokens, generating


class Trained(nn.Module):
    """What accelerate prepares in step 2: a module holding the student."""

    def __init__(self, student):
        super().__init__()
        self.student = student


def _moved(path: str) -> nn.Module:
    model = load_model(path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def main(student: str, data: str, prefix: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    processor = VLProcessor.from_pretrained(student)
    encoder = Encoder(processor)
    records = load_records(data)
    base = Path(data).parent
    # Rank 0 one prompt, rank 1 three: other batch shapes, other numbers of generated tokens.
    mine = [0] if rank == 0 else [1, 2, 3]
    prompts = [encoder.encode_prompt(records[i], base)[0] for i in mine]
    pad, eos = processor.pad_token_id, processor.tokenizer.eos_token_id

    whole = _moved(student)
    want = generate_tokens(whole, prompts, pad, eos, 8, 0.0)

    model = _moved(student)
    for layer in Backbone(model).layers:
        fully_shard(layer)
    trained = fully_shard(Trained(model))
    # accelerate runs FSDP only on GPUs; what the generation path asks of it is given here.
    accelerator = SimpleNamespace(
        distributed_type="FSDP", unwrap_model=lambda m: m, autocast=contextlib.nullcontext
    )
    copy = GenerationCopy(load_model(student, dtype=torch.float32))
    with generating(accelerator, trained, copy, step=1) as generator:
        got = generate_tokens(generator, prompts, pad, eos, 8, 0.0)
    whole_state = whole.state_dict()
    out = {
        "answers_equal": got == want,
        "copy_diff": max((copy.model.state_dict()[k] - v).abs().max().item() for k, v in whole_state.items()),
        "still_sharded": all(hasattr(p, "to_local") for p in Backbone(model).layers[0].parameters()),
        "answers": got,
    }
    with open(f"{prefix}.{rank}.json", "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
