"""A data file whose answers a model wrote: every assistant turn replaced by the model's greedy answer.

This is sequence-level KD's data (Kim & Rush, 2016): where the distillation set's answers are missing
or worse than the teacher, the teacher's own answers are what steps 2 and 3 and the SFT control train
on. A multi-turn record is answered turn by turn, each turn conditioned on the model's earlier answers
(as it would be in a conversation with it), so turn k of every record is generated in one pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlsi.data.processing import VLProcessor
from vlsi.data.records import ChatDataset, Encoder, RecordError
from vlsi.model.loading import load_model
from vlsi.run.evaluate import generate_answers


def _assistant_turns(record: dict) -> list[int]:
    return [i for i, turn in enumerate(record.get("conversations", [])) if turn.get("from") == "gpt"]


@torch.no_grad()
def relabel(
    model_path: str,
    data: str | Path,
    out: str | Path,
    image_root: str | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    max_length: int = 2048,
) -> dict:
    """Writes ``out`` (JSON, images referenced as absolute paths); returns counts of what was answered."""
    processor = VLProcessor.from_pretrained(model_path)
    if torch.cuda.is_available():
        # A teacher that fits no single GPU is spread over all of them, in its own dtype (untested here: no GPU).
        model = load_model(model_path, dtype="auto", device_map="auto").eval()
    else:
        model = load_model(model_path, dtype=torch.float32).eval()
    encoder = Encoder(processor, max_length)
    dataset = ChatDataset(data, encoder, image_root)
    records = list(dataset.records)  # each read is a fresh dict, ours to change
    turns = [_assistant_turns(r) for r in records]
    dropped: set[int] = set()
    for k in range(max((len(t) for t in turns), default=0)):
        todo = [i for i, t in enumerate(turns) if len(t) > k and i not in dropped]
        for start in tqdm(range(0, len(todo), batch_size), desc=f"relabel turn {k + 1}", dynamic_ncols=True):
            batch, prompts = [], []
            for i in todo[start : start + batch_size]:
                upto = dict(records[i], conversations=records[i]["conversations"][: turns[i][k] + 1])
                try:
                    prompts.append(encoder.encode_prompt(upto, dataset.base)[0])
                    batch.append(i)
                except RecordError as e:
                    dataset.skips.skip(str(dataset.path), i, records[i], e)
                    dropped.add(i)
            for i, answer in zip(
                batch, generate_answers(model, processor, prompts, max_new_tokens), strict=True
            ):
                records[i]["conversations"][turns[i][k]]["value"] = answer.strip()
    kept = []
    for i, record in enumerate(records):
        if i in dropped:
            continue
        # Absolute image paths: the relabelled file may live anywhere.
        if isinstance(record.get("image"), str):
            record["image"] = str((dataset.base / record["image"]).resolve())
        elif isinstance(record.get("image"), list):
            record["image"] = [str((dataset.base / p).resolve()) for p in record["image"]]
        kept.append(record)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(kept, indent=1) + "\n")
    tmp.replace(out)
    return {"records": len(kept), **dataset.skips.summary()}
