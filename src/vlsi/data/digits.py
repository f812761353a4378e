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
Each image draws from its own ``random.Random`` seeded by a hash of ``(SEED_KEY, seed, split, index)``, so
the same seed gives byte-identical files, and train and test images come from unrelated streams.
``SEED_KEY`` is a fixed string: changing it regenerates every image of every split (a test pins a digest
of a small output, so such a change fails CI instead of silently invalidating published numbers). A digit
tuple that appears in the test split is never drawn for train (``disjoint``), so test accuracy is
measured on combinations the model has never been trained on. Train records hold every question of
an image as one multi-turn conversation (every answer trains while the image is encoded once); test
records hold one question each.

Distillation sets (``distill``)
-------------------------------
``distill.json`` holds images new to the student base (their own stream, combinations disjoint from
test and validation) in the train format, with answers written as ``answers`` says, for the regime map
(``benchmarks/regimes.py``): ``exact`` ("20"), ``free`` (one of several phrasings, "The sum is 20."),
``working`` ("4 + 7 + 9 = 20"), with a fraction ``noise`` of its answers replaced by a wrong one. A model
trained on ``free`` or ``working`` answers is scored on the last number it writes (``vlsi eval --score
number``). Noise and phrasing draw from streams of their own, so the images are the same in every regime.
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
# Never change: every image of every split is derived from it (tests/test_digits.py pins a digest).
SEED_KEY = "vlsi.data.digits"
INKS = ((200, 40, 40), (30, 140, 50), (40, 70, 210), (150, 50, 190), (40, 40, 40))
BACKGROUND = (245, 245, 240)


def _sum(d: tuple[int, ...]) -> int:
    return sum(d)


def _last_digit_of_product(d: tuple[int, ...]) -> int:
    return _prod(d) % 10


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
# Every answer a skill can have (the wrong answers of ``noise`` are drawn from these).
ANSWER_RANGE = {
    "largest": range(10),
    "smallest": range(10),
    "sum": range(28),
    "range": range(10),
    "product": range(10),
    "odd": range(4),
    "sum_mod": range(10),
}
# Free-form phrasings of an answer; {a} is the number.
PHRASINGS = {
    "largest": ("The largest digit is {a}.", "It is {a}.", "{a}", "The biggest one is {a}."),
    "smallest": ("The smallest digit is {a}.", "It is {a}.", "{a}", "The smallest one is {a}."),
    "sum": ("The sum is {a}.", "They add up to {a}.", "{a}", "Adding them gives {a}."),
    "range": ("The difference is {a}.", "It is {a}.", "{a}", "Largest minus smallest is {a}."),
    "product": ("The last digit is {a}.", "It ends in {a}.", "{a}", "The product ends with {a}."),
    "odd": ("{a} of them are odd.", "There are {a}.", "{a}", "I count {a} odd digits."),
    "sum_mod": ("The last digit is {a}.", "It ends in {a}.", "{a}", "The sum ends with {a}."),
}
ANSWER_STYLES = ("exact", "free", "working")


def working(skill: str, d: tuple[int, ...], answer: int) -> str:
    """The answer with the working that leads to it, e.g. ``4 + 7 + 9 = 20``."""
    if skill == "sum":
        return " + ".join(map(str, d)) + f" = {answer}"
    if skill in ("largest", "smallest"):
        return f"{'max' if skill == 'largest' else 'min'}({', '.join(map(str, d))}) = {answer}"
    if skill == "range":
        return f"{max(d)} - {min(d)} = {answer}"
    if skill == "product":
        return " x ".join(map(str, d)) + f" = {_prod(d)}, last digit {answer}"
    if skill == "sum_mod":
        return " + ".join(map(str, d)) + f" = {sum(d)}, last digit {answer}"
    return f"odd: {', '.join(str(x) for x in d if x % 2) or 'none'}, so {answer}"


def _prod(d: tuple[int, ...]) -> int:
    p = 1
    for x in d:
        p *= x
    return p


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
    distill: int = field(
        default=0,
        metadata={"help": "images of a distillation set new to the student (distill.json); 0 = none"},
    )
    answers: str = field(
        default="exact", metadata={"help": "how distill.json's answers are written: exact | free | working"}
    )
    noise: float = field(
        default=0.0, metadata={"help": "fraction of distill.json's answers replaced by a wrong one (0-1)"}
    )


def _derive_seed(*key: object) -> int:
    # hashlib rather than hash(): str hashing is salted per process and would break reproducibility.
    digest = hashlib.sha256("/".join(map(str, (SEED_KEY, *key))).encode()).digest()
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
    if min(cfg.train, cfg.test, cfg.val, cfg.pool, cfg.distill) < 0:
        raise ValueError("train, test, val, pool and distill must be >= 0")
    if cfg.answers not in ANSWER_STYLES:
        raise ValueError(f"answers must be one of {', '.join(ANSWER_STYLES)}, not {cfg.answers!r}")
    if not 0.0 <= cfg.noise <= 1.0:
        raise ValueError(f"noise is a fraction of answers, 0-1; got {cfg.noise}")
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
        if split == "distill":
            # A stream of its own, so the images (and the order of questions) are those of every regime.
            qa = _written(cfg, qa, d, random.Random(_derive_seed(cfg.seed, split, idx, "answers")))
        if split in ("train", "pool", "distill"):
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


def _written(cfg: DigitsConfig, qa: list, d: tuple[int, ...], rng: random.Random) -> list:
    """The distillation set's answers: a wrong one with probability ``noise``, then phrased as ``answers``."""
    out = []
    for skill, question, answer in qa:
        value = int(answer)
        if rng.random() < cfg.noise:
            value = rng.choice([v for v in ANSWER_RANGE[skill] if v != value])
        if cfg.answers == "free":
            text = rng.choice(PHRASINGS[skill]).format(a=value)
        elif cfg.answers == "working":
            text = working(skill, d, value)
        else:
            text = str(value)
        out.append((skill, question, text))
    return out


def generate(cfg: DigitsConfig) -> dict:
    """Write ``train.json``, ``test.json`` (and ``val.json``, ``pool.json``, ``distill.json`` when asked) and
    ``images/``."""
    skills = _validate(cfg)
    out = Path(cfg.out)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"out": str(out), "seed": cfg.seed, "skills": skills, "splits": {}}
    held: set[tuple[int, ...]] = set()
    # Held-out splits first: their digit combinations are then banned from train and pool.
    splits = (("test", cfg.test), ("val", cfg.val), ("train", cfg.train), ("pool", cfg.pool))
    for split, n in (*splits, ("distill", cfg.distill)):
        if split in ("val", "pool", "distill") and n == 0:
            continue
        banned = held if cfg.disjoint and split in ("train", "pool", "distill") else set()
        records, seen = _split(cfg, skills, split, n, banned, image_dir)
        if split in ("test", "val"):
            held |= seen
        (out / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
        summary["splits"][split] = {"records": len(records), "images": n}
    return summary
