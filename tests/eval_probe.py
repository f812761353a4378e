"""Under ``torchrun`` (gloo on CPU): ``vlsi sft``'s learning-curve point on a student sharded as FSDP2 shards it.

``python -m torch.distributed.run --nproc_per_node 2 eval_probe.py STUDENT EVAL_DATA RESULT.json`` builds the
real accelerator of a 2-process run, shards the student as ``configs/accelerate/fsdp2.yaml`` has accelerate
shard it (each decoder and vision block its own unit, then the root; accelerate applies FSDP only on GPUs, so
``fully_shard`` is called here as it would call it), and takes one learning-curve point on it, as
:func:`vlsi.train.sft.learning_curve_point` does between steps. The point is scored against the unsharded
student's own greedy answers (rank 0 generates them alone first and writes them in as the references), so its
accuracy is 1.0 exactly when the sharded student answers every record as the whole one. Rank 0 writes the point
to RESULT.json. A rank-0-only evaluation of the sharded model never returns (its forward all-gathers shards the
other rank is not sending): the test runs this under a timeout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import fully_shard

from vlsi.data.processing import VLProcessor
from vlsi.data.records import ChatDataset, Encoder, collate
from vlsi.model.backbone import Backbone
from vlsi.run.evaluate import EvalConfig, evaluate
from vlsi.train.runtime import make_accelerator
from vlsi.train.sft import SFTConfig, build_model, learning_curve_point

LIMIT = 6


def main(student: str, eval_data: str, result: str) -> None:
    accelerator = make_accelerator("fp32", 0)
    processor = VLProcessor.from_pretrained(student)
    echo = Path(result).with_name("whole_answers.json")
    if accelerator.is_main_process:  # the unsharded student's answers, on one process, become the references
        whole = Path(result).with_name("whole")
        evaluate(EvalConfig(model=student, data=eval_data, limit=LIMIT, out=str(whole)), processor=processor)
        answers = [json.loads(line)["prediction"] for line in (whole / "predictions.jsonl").open()]
        records = json.loads(Path(eval_data).read_text())[:LIMIT]
        for record, answer in zip(records, answers, strict=True):
            record["conversations"][-1]["value"] = answer
        echo.write_text(json.dumps(records))
    accelerator.wait_for_everyone()
    cfg = SFTConfig(model=student, data=str(echo), out="unused", eval_data=str(echo), eval_limit=LIMIT)
    cfg.image_root = str(Path(eval_data).parent)
    model = build_model(cfg)
    blocks = [*Backbone(model).layers, *Backbone(model).vision_tower.blocks]
    for block in blocks:
        fully_shard(block, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=True)
    assert all(hasattr(p, "to_local") for p in model.parameters())  # every parameter sharded
    # A training micro-step first, as sft takes its points after steps (FSDP2 sets itself up in the first).
    model.train()
    dataset = ChatDataset(echo, Encoder(processor), cfg.image_root)
    batch = collate([dataset[i] for i in range(2)], processor.pad_token_id)
    model(**batch).loss.backward()
    point = learning_curve_point(accelerator, model, processor, cfg)
    if accelerator.is_main_process:
        Path(result).write_text(json.dumps(point))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
