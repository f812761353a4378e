"""Greedy-generation evaluation on a LLaVA-format file.

Each record's last assistant turn is the reference; the model answers the conversation up to it.
Scoring is normalised exact match, with multiple-choice letters recognised, or (``score="number"``) the
last number of the answer against the reference's, for answers written in words or with their working. Per-skill accuracy is
reported when records carry a ``skill`` (or ``category``) field, next to that skill's chance level:
the accuracy of always giving the skill's most frequent reference answer.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlsi.data.processing import VLProcessor
from vlsi.data.records import ChatDataset, Encoder, RecordError, collate
from vlsi.model.loading import load_model

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_OPTION = re.compile(r"^\s*\(?([A-Z])[\).:]\s*(.+?)\s*$", re.MULTILINE)
# "B", "B.", "B)", "(B) text", "B: text" -- but not the article in "A red circle".
_LETTER = re.compile(r"^(?:\(([A-Z])\)|([A-Z])(?:[).:]|$))")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
SCORES = ("exact", "number")


@dataclass
class EvalConfig:
    model: str = field(metadata={"help": "checkpoint path or hub id"})
    data: str = field(metadata={"help": "LLaVA-format JSON/JSONL file"})
    out: str | None = field(default=None, metadata={"help": "write metrics.json and predictions.jsonl here"})
    image_root: str | None = field(default=None, metadata={"help": "image folder (default: the data file's)"})
    batch_size: int = field(default=32, metadata={"help": "prompts generated together"})
    max_new_tokens: int = field(default=32, metadata={"help": "generation budget per answer"})
    max_length: int = field(default=2048, metadata={"help": "prompts longer than this are skipped"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N records (0 = all)"})
    score: str = field(
        default="exact",
        metadata={
            "help": "exact (normalised exact match) | number (the last number written, as the reference's)"
        },
    )

    def __post_init__(self):
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {', '.join(SCORES)}, not {self.score!r}")


def normalize(text: str) -> str:
    text = text.lower().strip()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def options(question: str) -> dict[str, str]:
    """Multiple-choice options written as lines 'A. text' / '(B) text' in the question."""
    return {m.group(1): m.group(2) for m in _OPTION.finditer(question)}


def last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def is_correct(prediction: str, reference: str, question: str = "", score: str = "exact") -> bool:
    if score == "number":
        want = last_number(reference)
        return want is not None and last_number(prediction) == want
    ref = reference.strip()
    choices = options(question)
    if choices and re.fullmatch(r"\(?[A-Z]\)?\.?", ref):
        letter = ref.strip("().")
        m = _LETTER.match(prediction.strip())
        if m:
            return (m.group(1) or m.group(2)) == letter
        # An answer that spells out the option's text also counts.
        return letter in choices and normalize(prediction) == normalize(choices[letter])
    return normalize(prediction) == normalize(ref)


def skill_of(record: dict) -> str | None:
    for key in ("skill", "category"):
        if isinstance(record.get(key), str):
            return record[key]
    return None


def answer_key(reference: str, score: str) -> str | None:
    """What a reference counts as under ``score``: the chance level is the most frequent one's rate."""
    return last_number(reference) if score == "number" else normalize(reference)


def summarize(rows: list[dict], skipped: dict, score: str = "exact") -> dict:
    metrics = {"accuracy": sum(r["correct"] for r in rows) / max(1, len(rows)), "n": len(rows), **skipped}
    by_skill = defaultdict(list)
    for r in rows:
        if r["skill"] is not None:
            by_skill[r["skill"]].append(r)
    if by_skill:
        metrics["per_skill"] = {
            skill: {
                "accuracy": sum(r["correct"] for r in rs) / len(rs),
                "n": len(rs),
                "chance": Counter(answer_key(r["reference"], score) for r in rs).most_common(1)[0][1]
                / len(rs),
            }
            for skill, rs in sorted(by_skill.items())
        }
    return metrics


@torch.no_grad()
def generate_answers(model, processor: VLProcessor, prompts: list[dict], max_new_tokens: int) -> list[str]:
    batch = collate(prompts, processor.pad_token_id, padding_side="left")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.pad_token_id,
    )
    new = out[:, batch["input_ids"].shape[1] :]
    return processor.tokenizer.batch_decode(new, skip_special_tokens=True)


def evaluate(
    cfg: EvalConfig, model=None, processor: VLProcessor | None = None, progress: bool = True
) -> dict:
    processor = processor or VLProcessor.from_pretrained(cfg.model)
    if model is None:
        model = load_model(cfg.model, dtype=torch.float32)
    model.eval()
    encoder = Encoder(processor, cfg.max_length)
    dataset = ChatDataset(cfg.data, encoder, cfg.image_root)
    records = dataset.records[: cfg.limit] if cfg.limit else dataset.records
    rows, pending = [], []

    def flush():
        answers = generate_answers(model, processor, [p[1] for p in pending], cfg.max_new_tokens)
        for (index, _, reference), prediction in zip(pending, answers, strict=True):
            record = records[index]
            question = record["conversations"][-2]["value"] if len(record["conversations"]) > 1 else ""
            rows.append(
                {
                    "id": record.get("id", index),
                    "skill": skill_of(record),
                    "prediction": prediction.strip(),
                    "reference": reference,
                    "correct": is_correct(prediction, reference, question, cfg.score),
                }
            )
        pending.clear()

    for index in tqdm(range(len(records)), desc="eval", dynamic_ncols=True, disable=not progress):
        try:
            prompt, reference = encoder.encode_prompt(records[index], dataset.base)
        except RecordError as e:
            dataset.skips.skip(str(dataset.path), index, records[index], e)
            continue
        pending.append((index, prompt, reference))
        if len(pending) == cfg.batch_size:
            flush()
    if pending:
        flush()

    metrics = summarize(rows, dataset.skips.summary(), cfg.score)
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "predictions.jsonl").open("w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
