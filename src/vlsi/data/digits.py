"""The built-in tiny task: seven-segment digits and fixed questions that combine them.

Why this task
-------------
The earlier ``grid`` task (:mod:`vlsi.data.synth`) asks where things are ("the shape at the top middle").
A Qwen2-VL language model has rotary positions only, so binding a position word to a visual token has
to be learned, and in a few CPU minutes neither teacher nor student learns it: the teacher ended a
few points above the student and there was nothing to distil. Here every question is a fixed
sentence and the variation is all in the image, so nothing has to be bound: the difficulty sits in
reading the digits (perception, shared by teacher and student through one vision encoder) and in
combining them (reasoning over several steps in the language model, where depth and width matter).

Every image is a row of ``digits`` seven-segment digits, each ``cell`` px wide and ``2 * cell`` px tall,
drawn in a random colour, stroke and offset. With the tiny image processor's 16 px merged patches a
digit covers two visual tokens (its top and bottom halves), so even reading one digit combines tokens.
The questions are symmetric in the digits (sum, largest, ...): an answer never depends on which digit
is left of which, the position lookup that the grid task showed to be slow.

Answers are written with digits ("17"), one byte-level token per digit, so a two-digit answer is two
steps of generation. Every skill's answer distribution is reported as its chance level by
``vlsi eval`` (the rate of its most frequent answer).

Splits and determinism
----------------------
Each image draws from its own ``random.Random`` seeded by a hash of ``(seed, split, index)``, so the
same seed gives byte-identical files, and train and test images come from unrelated streams. A digit
tuple that appears in the test split is never drawn for train (``disjoint``), so test accuracy is
measured on combinations the model has never been trained on. Train records hold every question of
an image as one multi-turn conversation (every answer trains while the image is encoded once); test
records hold one question each.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

# Segment layout: a (top), b (upper right), c (lower right), d (bottom), e (lower left), f (upper left), g (middle).
SEGMENTS = {
    0: "abcdef",
    1: "bc",
    2: "abged",
    3: "abgcd",
    4: "fgbc",
    5: "afgcd",
    6: "afgedc",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}
INKS = ((200, 40, 40), (30, 140, 50), (40, 70, 210), (150, 50, 190), (40, 40, 40))
BACKGROUND = (245, 245, 240)


def _sum(d: tuple[int, ...]) -> int:
    return sum(d)


def _last_digit_of_product(d: tuple[int, ...]) -> int:
    p = 1
    for x in d:
        p *= x
    return p % 10


# Skill name -> (question, answer function). Each question is one fixed sentence: the image alone decides.
SKILLS: dict[str, tuple[str, Callable[[tuple[int, ...]], int]]] = {
    "largest": ("What is the largest digit?", max),
    "smallest": ("What is the smallest digit?", min),
    "sum": ("What is the sum?", _sum),
    "range": ("Largest minus smallest?", lambda d: max(d) - min(d)),
    "product": ("Last digit of the product?", _last_digit_of_product),
    "odd": ("How many digits are odd?", lambda d: sum(x % 2 for x in d)),
    "sum_mod": ("Last digit of the sum?", lambda d: sum(d) % 10),
}
DEFAULT_SKILLS = "largest,range,sum"


@dataclass
class DigitsConfig:
    out: str = field(metadata={"help": "output directory (receives train.json, test.json, images/)"})
    train: int = field(default=3000, metadata={"help": "train images (each one multi-turn record)"})
    test: int = field(default=200, metadata={"help": "test images (one record per question)"})
    val: int = field(
        default=0, metadata={"help": "validation images (one record per question), for choosing settings"}
    )
    pool: int = field(
        default=0,
        metadata={"help": "images of a larger train pool (pool.json) drawn from another stream; 0 = none"},
    )
    seed: int = field(default=0, metadata={"help": "random seed; same seed gives byte-identical output"})
    digits: int = field(default=3, metadata={"help": "digits per image (2-4)"})
    cell: int = field(default=16, metadata={"help": "pixels per digit column; a digit is cell x 2*cell"})
    skills: str = field(
        default=DEFAULT_SKILLS, metadata={"help": "comma-separated skills: " + ", ".join(SKILLS)}
    )
    disjoint: bool = field(
        default=True, metadata={"help": "never train on a digit combination that a test or val image shows"}
    )


def _derive_seed(*key: object) -> int:
    # hashlib rather than hash(): str hashing is salted per process and would break reproducibility.
    digest = hashlib.sha256("/".join(map(str, ("vlsi.data.digits", *key))).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _segment_boxes(x0: int, y0: int, w: int, h: int, t: int) -> dict[str, tuple[int, int, int, int]]:
    mid = y0 + h // 2
    return {
        "a": (x0, y0, x0 + w - 1, y0 + t - 1),
        "b": (x0 + w - t, y0, x0 + w - 1, mid),
        "c": (x0 + w - t, mid, x0 + w - 1, y0 + h - 1),
        "d": (x0, y0 + h - t, x0 + w - 1, y0 + h - 1),
        "e": (x0, mid, x0 + t - 1, y0 + h - 1),
        "f": (x0, y0, x0 + t - 1, mid),
        "g": (x0, mid - t // 2, x0 + w - 1, mid - t // 2 + t - 1),
    }


def render(rng: random.Random, digits: tuple[int, ...], cell: int) -> Image.Image:
    """Seven-segment digits side by side, each inside its own ``cell`` x ``2 * cell`` column."""
    image = Image.new("RGB", (cell * len(digits), 2 * cell), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, digit in enumerate(digits):
        w, h = rng.randint(cell // 2, cell - 4), rng.randint(cell + 4, 2 * cell - 6)
        t = rng.randint(2, 3)
        # Jittered but clamped inside the column, so a digit never leaks into its neighbour's tokens.
        x0 = i * cell + rng.randint(1, cell - w - 1)
        y0 = rng.randint(2, 2 * cell - h - 2)
        ink = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in rng.choice(INKS))
        boxes = _segment_boxes(x0, y0, w, h, t)
        for seg in SEGMENTS[digit]:
            draw.rectangle(boxes[seg], fill=ink)
    return image


def _validate(cfg: DigitsConfig) -> list[str]:
    skills = [s.strip() for s in cfg.skills.split(",") if s.strip()]
    unknown = [s for s in skills if s not in SKILLS]
    if unknown or not skills:
        raise ValueError(f"unknown skills {unknown or cfg.skills!r}; choose from {', '.join(SKILLS)}")
    if not 2 <= cfg.digits <= 4:
        raise ValueError(f"digits must be 2-4, got {cfg.digits}")
    if cfg.cell < 12:
        raise ValueError(f"cell must be >= 12 pixels, got {cfg.cell}")
    if min(cfg.train, cfg.test, cfg.val, cfg.pool) < 0:
        raise ValueError("train, test, val and pool must be >= 0")
    held = cfg.test + cfg.val
    if cfg.disjoint and held and held * 2 > 10**cfg.digits:
        raise ValueError(
            f"{held} test+val images would hold out most of the {10**cfg.digits} digit combinations; "
            "lower --test/--val, raise --digits or pass --no-disjoint"
        )
    return skills


def _draw_digits(rng: random.Random, n: int, banned: set[tuple[int, ...]]) -> tuple[int, ...]:
    while True:
        d = tuple(rng.randrange(10) for _ in range(n))
        if d not in banned:
            return d


def _split(cfg: DigitsConfig, skills: list[str], split: str, n: int, banned: set, image_dir: Path):
    records, seen = [], set()
    for idx in range(n):
        rng = random.Random(_derive_seed(cfg.seed, split, idx))
        d = _draw_digits(rng, cfg.digits, banned)
        seen.add(d)
        name = f"{split}_{idx:05d}.png"
        render(rng, d, cfg.cell).save(image_dir / name, format="PNG")
        qa = [(s, SKILLS[s][0], str(SKILLS[s][1](d))) for s in skills]
        base = {"image": f"images/{name}", "digits": "".join(map(str, d))}
        if split in ("train", "pool"):
            rng.shuffle(qa)
            turns = []
            for k, (_, q, a) in enumerate(qa):
                turns += [
                    {"from": "human", "value": ("<image>\n" if k == 0 else "") + q},
                    {"from": "gpt", "value": a},
                ]
            records.append({"id": f"{split}-{idx:05d}", **base, "skill": "mixed", "conversations": turns})
        else:
            for s, q, a in qa:
                records.append(
                    {
                        "id": f"{split}-{idx:05d}-{s}",
                        **base,
                        "skill": s,
                        "conversations": [
                            {"from": "human", "value": f"<image>\n{q}"},
                            {"from": "gpt", "value": a},
                        ],
                    }
                )
    return records, seen


def generate(cfg: DigitsConfig) -> dict:
    """Write ``train.json``, ``test.json`` (and ``val.json``, ``pool.json`` when asked) and ``images/``."""
    skills = _validate(cfg)
    out = Path(cfg.out)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"out": str(out), "seed": cfg.seed, "skills": skills, "splits": {}}
    held: set[tuple[int, ...]] = set()
    # Held-out splits first: their digit combinations are then banned from train and pool.
    for split, n in (("test", cfg.test), ("val", cfg.val), ("train", cfg.train), ("pool", cfg.pool)):
        if split in ("val", "pool") and n == 0:
            continue
        banned = held if cfg.disjoint and split in ("train", "pool") else set()
        records, seen = _split(cfg, skills, split, n, banned, image_dir)
        if split in ("test", "val"):
            held |= seen
        (out / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
        summary["splits"][split] = {"records": len(records), "images": n}
    return summary
