"""Deterministic synthetic visual-question data in LLaVA format, small enough to train on a CPU.

Task design
-----------
Every image is a ``grid`` x ``grid`` board of ``cell``-pixel cells on a near-white background; a cell is
either empty or holds one coloured shape (4 shapes x 5 colours). The 16-px cell is deliberate: the vision
encoder cuts 8-px patches and merges them 2x2, so one merged visual token sees exactly one cell and a
question about "the top left" is a question about one token. Shapes never cross their cell.

Four skills, each with an "easy" and a "hard" level, probe increasingly relational reasoning:

* ``attribute`` -- colour / shape / both of the object at a named position (pure token read-out).
* ``count``     -- how many objects match a colour, a shape, both, or nothing (aggregation over tokens).
* ``spatial``   -- yes/no left/right/above/below between two unique objects, or naming the neighbour of one
  (binding an object to its position, then looking one token away).
* ``pattern``   -- the board is filled in reading order with a period-2/3 sequence and one cell is left
  empty; "what is missing?" (in-context induction over the whole board). The hard level varies colour and
  shape together and is multiple choice, with distractors drawn from the pattern itself.

Answers are lowercase words, never digits, so an answer spans several byte-level BPE tokens and a model
cannot score by emitting one lucky digit. Answers are computed from the board that is then rendered, so
they are correct by construction; where the answer value could collapse onto one value (counts, yes/no,
the option letter) the generator picks the answer first and builds a board that realises it.

Determinism: each image draws from its own ``random.Random`` whose seed is a hash of
``(seed, split, image index)``; the split-level schedule of skills draws from another such stream. Train and
test therefore use unrelated streams and never share an image, and the same seed reproduces the same JSON
and byte-identical PNGs.

Several records can share an image (``questions_per_image``), always of different skills. A pattern board is
full, so it cannot host a ``spatial`` question (no object is unique); the schedule never pairs the two. With
2 questions per image the four skills stay balanced; with 3 every image must carry ``attribute`` and
``count``, so those two get a third of the records each and the other two a sixth.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

SKILLS = ("attribute", "count", "spatial", "pattern")
LEVELS = ("easy", "hard")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (40, 165, 60),
    "blue": (40, 85, 225),
    "yellow": (235, 200, 30),
    "purple": (150, 55, 195),
}
SHAPES = ("circle", "square", "triangle", "cross")
BACKGROUND = (246, 246, 242)
ITEMS = tuple((c, s) for c in COLOURS for s in SHAPES)
COLOUR_JITTER = 15
OPTION_LETTERS = "ABCD"

_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
# Share of count questions whose answer is "zero": enough that "absent" must be recognised, few enough
# that "zero" never becomes the majority answer.
_ZERO_RATE = 0.15
_MAX_COUNT = 4
_MAX_TRIES = 1000
# Never change: every board of every split is derived from it.
SEED_KEY = "vlsi.data.synth"
_STALE_IMAGE = re.compile(r"(train|test)_\d+\.png")

Item = tuple[str, str]
Board = list  # list[Item | None], row-major, index = row * grid + col


@dataclass
class SynthConfig:
    out: str = field(metadata={"help": "output directory (receives train.json, test.json, images/)"})
    train: int = field(
        default=6000, metadata={"help": "number of train questions (before multi-turn grouping)"}
    )
    test: int = field(default=500, metadata={"help": "number of test records"})
    seed: int = field(default=0, metadata={"help": "random seed; same seed gives byte-identical output"})
    grid: int = field(default=3, metadata={"help": "cells per board side (>= 3)"})
    cell: int = field(default=16, metadata={"help": "pixels per cell; 16 = one merged 2x2 patch of 8 px"})
    questions_per_image: int = field(
        default=2, metadata={"help": "records sharing one image, each of a different skill (1-3)"}
    )
    position_cue: int = field(
        default=0,
        metadata={"help": "tint each cell's background by row/column (0 = plain); see the module doc"},
    )
    captions: bool = field(
        default=False,
        metadata={"help": "add one 'describe the board' record per train image (dense supervision)"},
    )
    multi_turn: bool = field(
        default=True,
        metadata={"help": "train questions on one image form one multi-turn conversation (test: one each)"},
    )


def number_word(n: int) -> str:
    if not 0 <= n < 100:
        raise ValueError(f"no number word for {n}")
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]}-{_ONES[ones]}"


def position_name(row: int, col: int, grid: int) -> str:
    """Words for a cell: "top left" ... "center" on a 3x3 board, "row R, column C" (1-based) otherwise."""
    if grid == 3:
        if (row, col) == (1, 1):
            return "center"
        return f"{('top', 'middle', 'bottom')[row]} {('left', 'middle', 'right')[col]}"
    return f"row {row + 1}, column {col + 1}"


def _at(idx: int, grid: int) -> str:
    name = position_name(*divmod(idx, grid), grid)
    return name if name.startswith("row ") else f"the {name}"


def _describe(item: Item) -> str:
    return f"{item[0]} {item[1]}"


def _derive_seed(*key: object) -> int:
    # hashlib rather than hash(): str hashing is salted per process and would break reproducibility.
    digest = hashlib.sha256("/".join(map(str, (SEED_KEY, *key))).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _occupancy_range(grid: int) -> tuple[int, int]:
    n = grid * grid
    lo = max(2, round(n / 3))
    return lo, max(lo, round(2 * n / 3))


def _place(rng: random.Random, grid: int, items: list[Item]) -> Board:
    board: Board = [None] * (grid * grid)
    for idx, item in zip(rng.sample(range(grid * grid), len(items)), items, strict=True):
        board[idx] = item
    return board


def _random_board(rng: random.Random, grid: int) -> Board:
    lo, hi = _occupancy_range(grid)
    return _place(rng, grid, [rng.choice(ITEMS) for _ in range(rng.randint(lo, hi))])


# ---------------------------------------------------------------------------------------------- count
# A count query is (colour or None, shape or None): (None, None) counts every shape.
CountQuery = tuple


def _matches(item: Item | None, query: CountQuery) -> bool:
    return item is not None and all(
        want is None or have == want for have, want in zip(item, query, strict=True)
    )


def _count_text(query: CountQuery) -> str:
    colour, shape = query
    noun = _PLURAL[shape] if shape else "shapes"
    return f"How many {colour + ' ' if colour else ''}{noun} are there?"


def _plan_count(rng: random.Random, level: str, grid: int, reserve: int) -> tuple[CountQuery, int]:
    """Pick the query and its answer before the board exists, so no answer value can dominate.

    ``reserve`` cells are kept for non-matching objects so that a spatial question on the same image still
    finds unique objects.
    """
    lo, hi = _occupancy_range(grid)
    if level == "easy":
        kind = rng.choice(("total", "colour", "colour", "shape", "shape"))
        if kind == "total":
            return (None, None), rng.randint(lo, hi)
        query = (rng.choice(tuple(COLOURS)), None) if kind == "colour" else (None, rng.choice(SHAPES))
    else:
        query = rng.choice(ITEMS)
    top = max(1, min(_MAX_COUNT, hi - reserve))
    return query, 0 if rng.random() < _ZERO_RATE else rng.randint(1, top)


def _count_board(rng: random.Random, grid: int, query: CountQuery, answer: int, reserve: int) -> Board:
    lo, hi = _occupancy_range(grid)
    if query == (None, None):
        return _place(rng, grid, [rng.choice(ITEMS) for _ in range(answer)])
    n = rng.randint(min(hi, max(lo, answer + reserve)), hi)
    hits = [it for it in ITEMS if _matches(it, query)]
    misses = [it for it in ITEMS if not _matches(it, query)]
    # Near misses (one attribute shared with a conjunction) make "blue triangle" differ from "blue" or
    # "triangle"; without them the hard level would collapse into the easy one.
    near = [it for it in misses if it[0] == query[0] or it[1] == query[1]] if None not in query else misses
    items = [rng.choice(hits) for _ in range(answer)]
    items += [rng.choice(near if rng.random() < 0.5 else misses) for _ in range(n - answer)]
    return _place(rng, grid, items)


def _count_query_on(rng: random.Random, board: Board, level: str) -> CountQuery:
    """Query for a board built for another skill (a pattern board), chosen answer-first.

    A pattern board repeats each item about three times, so a uniformly drawn query would make "three" the
    majority answer; drawing the answer value first spreads answers over whatever the board offers.
    """
    queries = list(ITEMS) if level == "hard" else [(c, None) for c in COLOURS] + [(None, s) for s in SHAPES]
    occupied = sum(it is not None for it in board)
    by_answer: dict[int, list[CountQuery]] = {}
    for query in queries:
        by_answer.setdefault(sum(_matches(it, query) for it in board), []).append(query)
    # A query matching every object is the total count in disguise, a constant on a full pattern board.
    choices = sorted(a for a in by_answer if 0 < a < occupied) or sorted(a for a in by_answer if a)
    answer = 0 if 0 in by_answer and rng.random() < _ZERO_RATE else rng.choice(choices)
    return rng.choice(by_answer[answer])


def _ask_count(rng, board, grid, level, plan):
    query = plan[0] if plan else _count_query_on(rng, board, level)
    return _count_text(query), number_word(sum(_matches(it, query) for it in board))


# ------------------------------------------------------------------------------------------- other skills
def _ask_attribute(rng, board, grid, level, plan):
    idx = rng.choice([i for i, it in enumerate(board) if it is not None])
    colour, shape = board[idx]
    if level == "hard":
        return f"What is at {_at(idx, grid)}?", f"{colour} {shape}"
    if rng.random() < 0.5:
        return f"What colour is the shape at {_at(idx, grid)}?", colour
    return f"What shape is at {_at(idx, grid)}?", shape


# relation -> (row/col axis it compares, step to the adjacent cell)
_RELATIONS = {
    "to the left of": (1, (0, -1)),
    "to the right of": (1, (0, 1)),
    "above": (0, (-1, 0)),
    "below": (0, (1, 0)),
}


def _holds(relation: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    axis, step = _RELATIONS[relation]
    return (a[axis] - b[axis]) * sum(step) > 0


def _unique_cells(board: Board) -> list[int]:
    counts = Counter(it for it in board if it is not None)
    return [i for i, it in enumerate(board) if it is not None and counts[it] == 1]


def _ask_spatial(rng, board, grid, level, plan):
    unique = _unique_cells(board)
    relations = list(_RELATIONS)
    rng.shuffle(relations)
    if level == "easy":
        want_yes = rng.random() < 0.5
        for relation in relations:
            axis = _RELATIONS[relation][0]
            pairs = [
                (i, j)
                for i in unique
                for j in unique
                if i < j and divmod(i, grid)[axis] != divmod(j, grid)[axis]
            ]
            if not pairs:
                continue
            i, j = rng.choice(pairs)
            # With the two objects on different rows/columns, swapping them flips the truth value, so
            # yes/no balance comes for free from the coin above.
            if _holds(relation, divmod(i, grid), divmod(j, grid)) != want_yes:
                i, j = j, i
            answer = "yes" if _holds(relation, divmod(i, grid), divmod(j, grid)) else "no"
            return f"Is the {_describe(board[i])} {relation} the {_describe(board[j])}?", answer
        return None
    for relation in relations:
        step = _RELATIONS[relation][1]
        neighbours = []
        for i in unique:
            row, col = divmod(i, grid)
            r, c = row + step[0], col + step[1]
            if 0 <= r < grid and 0 <= c < grid and board[r * grid + c] is not None:
                neighbours.append((i, r * grid + c))
        if neighbours:
            i, j = rng.choice(neighbours)
            return f"What is directly {relation} the {_describe(board[i])}?", _describe(board[j])
    return None


def _pattern_board(rng: random.Random, grid: int, level: str) -> Board:
    n = grid * grid
    if level == "hard":
        period = 3
        seq = list(zip(rng.sample(list(COLOURS), 3), rng.sample(SHAPES, 3), strict=True))
    else:
        period = rng.choice((2, 3))
        if rng.random() < 0.5:
            shape = rng.choice(SHAPES)
            seq = [(c, shape) for c in rng.sample(list(COLOURS), period)]
        else:
            colour = rng.choice(tuple(COLOURS))
            seq = [(colour, s) for s in rng.sample(SHAPES, period)]
    board: Board = [seq[i % period] for i in range(n)]
    # Not the first cell: the sequence must start visibly for "reading order" to be well defined.
    board[rng.randrange(1, n)] = None
    return board


def _pattern_period(board: Board) -> int:
    for period in (2, 3):
        if all(a is None or b is None or a == b for a, b in zip(board, board[period:], strict=False)):
            return period
    raise AssertionError("board is not a period-2/3 pattern")


def _ask_pattern(rng, board, grid, level, plan):
    missing = board.index(None)
    period = _pattern_period(board)
    # Read the answer off another visible cell of the same phase: answerable from the image by definition.
    answer = next(board[i] for i in range(missing % period, len(board), period) if board[i] is not None)
    question = "What is missing in this pattern?"
    if level == "easy":
        return question, _describe(answer)
    seq = list(dict.fromkeys(it for it in board if it is not None))
    distractors = rng.sample([it for it in seq if it != answer], rng.randint(1, 2))
    colours, shapes = {c for c, _ in seq}, {s for _, s in seq}
    # Recombinations of the pattern's own colours and shapes are the most tempting wrong answers.
    near = [(c, s) for c in sorted(colours) for s in sorted(shapes) if (c, s) not in seq]
    far = [it for it in ITEMS if it not in seq and it not in near]
    while len(distractors) < len(OPTION_LETTERS) - 1:
        pool = near if rng.random() < 0.5 else far
        pool = [it for it in pool if it not in distractors] or [it for it in far if it not in distractors]
        distractors.append(rng.choice(pool))
    rng.shuffle(distractors)
    correct = rng.randrange(len(OPTION_LETTERS))
    options = distractors[:correct] + [answer] + distractors[correct:]
    lines = "\n".join(
        f"{letter}. {_describe(it)}" for letter, it in zip(OPTION_LETTERS, options, strict=True)
    )
    return f"{question}\n{lines}\nAnswer with the letter.", OPTION_LETTERS[correct]


_ASK = {"attribute": _ask_attribute, "count": _ask_count, "spatial": _ask_spatial, "pattern": _ask_pattern}


# ---------------------------------------------------------------------------------------------- images
def _build_image(rng: random.Random, grid: int, tasks: list[tuple[str, str]]) -> tuple[Board, list[tuple]]:
    levels = dict(tasks)
    plan = None
    if "count" in levels and "pattern" not in levels:
        reserve = 2 if "spatial" in levels else 0
        # Fixed across retries: re-planning on rejection would skew the count answers that are hardest
        # to combine with another skill.
        plan = (*_plan_count(rng, levels["count"], grid, reserve), reserve)
    for _ in range(_MAX_TRIES):
        if "pattern" in levels:
            board = _pattern_board(rng, grid, levels["pattern"])
        elif plan:
            board = _count_board(rng, grid, *plan)
        else:
            board = _random_board(rng, grid)
        qa = []
        for skill, level in tasks:
            got = _ASK[skill](rng, board, grid, level, plan)
            if got is None:
                break
            qa.append((skill, level, *got))
        else:
            return board, qa
    raise RuntimeError(f"could not build a board for {tasks} in {_MAX_TRIES} tries")


def _jittered_start(rng: random.Random, origin: int, cell: int, size: int) -> int:
    start = origin + (cell - size) // 2 + rng.randint(-1, 1)
    # Clamped so a shape never leaks into the neighbouring cell, i.e. the neighbouring visual token.
    return min(max(start, origin), origin + cell - size)


def _render(rng: random.Random, board: Board, grid: int, cell: int, cue: int = 0) -> Image.Image:
    image = Image.new("RGB", (grid * cell, grid * cell), BACKGROUND)
    draw = ImageDraw.Draw(image)
    if cue:
        for idx in range(grid * grid):
            row, col = divmod(idx, grid)
            tint = (BACKGROUND[0], BACKGROUND[1] - cue * row, BACKGROUND[2] - cue * col)
            draw.rectangle((col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1), fill=tint)
    small, large = max(3, round(0.6 * cell)), max(3, round(0.85 * cell))
    for idx, item in enumerate(board):
        if item is None:
            continue
        row, col = divmod(idx, grid)
        colour = tuple(
            min(255, max(0, v + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for v in COLOURS[item[0]]
        )
        size = rng.randint(small, large)
        x0, y0 = (_jittered_start(rng, i * cell, cell, size) for i in (col, row))
        x1, y1 = x0 + size - 1, y0 + size - 1
        shape = item[1]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == "triangle":
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
        else:
            bar = max(2, round(size / 3))
            off = (size - bar) // 2
            draw.rectangle((x0 + off, y0, x0 + off + bar - 1, y1), fill=colour)
            draw.rectangle((x0, y0 + off, x1, y0 + off + bar - 1), fill=colour)
    return image


# -------------------------------------------------------------------------------------------- schedule
def _compatible(skill: str, chosen: list[str]) -> bool:
    # A full pattern board has no unique object, so it cannot carry a spatial question.
    return not ({skill, *chosen} >= {"pattern", "spatial"})


def _schedule(rng: random.Random, n_records: int, per_image: int) -> list[list[tuple[str, str]]]:
    """Skills and levels per image: least-used compatible skill first, levels balanced per skill."""
    used = Counter({s: 0 for s in SKILLS})
    phase: dict[str, int] = {}
    images = []
    for start in range(0, n_records, per_image):
        chosen: list[str] = []
        tasks = []
        for _ in range(min(per_image, n_records - start)):
            allowed = [s for s in SKILLS if s not in chosen and _compatible(s, chosen)]
            low = min(used[s] for s in allowed)
            skill = rng.choice([s for s in allowed if used[s] == low])
            # Each consecutive pair of a skill's records gets one easy and one hard, in random order.
            if used[skill] % 2 == 0:
                phase[skill] = rng.randrange(2)
            tasks.append((skill, LEVELS[phase[skill] ^ (used[skill] % 2)]))
            chosen.append(skill)
            used[skill] += 1
        images.append(tasks)
    return images


def _validate(cfg: SynthConfig) -> None:
    if cfg.grid < 3:
        raise ValueError("grid must be >= 3 (a period-3 pattern needs at least 9 cells)")
    if cfg.cell < 8:
        raise ValueError("cell must be >= 8 pixels")
    if not 1 <= cfg.questions_per_image <= 3:
        raise ValueError("questions_per_image must be 1, 2 or 3 (at most 3 skills fit one board)")
    if cfg.train < 0 or cfg.test < 0:
        raise ValueError("train and test must be >= 0")


def _generate_split(cfg: SynthConfig, split: str, n_records: int, image_dir: Path) -> list[dict]:
    schedule = _schedule(
        random.Random(_derive_seed(cfg.seed, split, "schedule")), n_records, cfg.questions_per_image
    )
    records = []
    for image_idx, tasks in enumerate(schedule):
        rng = random.Random(_derive_seed(cfg.seed, split, image_idx))
        board, qa = _build_image(rng, cfg.grid, tasks)
        name = f"{split}_{image_idx:05d}.png"
        _render(rng, board, cfg.grid, cfg.cell, cfg.position_cue).save(image_dir / name, format="PNG")
        image_records = [
            {
                "id": f"{split}-{image_idx:05d}-{q_idx}",
                "image": f"images/{name}",
                "skill": skill,
                "level": level,
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
            for q_idx, (skill, level, question, answer) in enumerate(qa)
        ]
        if split == "train" and cfg.multi_turn and len(image_records) > 1:
            image_records = [_as_conversation(image_records)]
        records.extend(image_records)
        if split == "train" and cfg.captions:
            records.append(_caption_record(board, cfg.grid, f"{split}-{image_idx:05d}-c", f"images/{name}"))
    return records


def _as_conversation(records: list[dict]) -> dict:
    """One multi-turn record from single-question records on the same image: every answer in it
    trains the model while the image is encoded once. Later turns drop the image placeholder."""
    turns = list(records[0]["conversations"])
    for rec in records[1:]:
        human, gpt = rec["conversations"]
        turns += [dict(human, value=human["value"].removeprefix("<image>\n")), gpt]
    return {
        **records[0],
        "id": records[0]["id"].rsplit("-", 1)[0],
        "skill": "mixed",
        "level": "mixed",
        "conversations": turns,
    }


def _caption_record(board: Board, grid: int, rid: str, image: str) -> dict:
    """A dense description of every occupied cell in reading order. Train-only, like the captioning
    data VLMs are aligned on: it supervises every visual token of the board, where a question
    supervises one or two, and it is never asked at test time."""
    parts = [f"{_describe(item)} at {_at(idx, grid)}" for idx, item in enumerate(board) if item is not None]
    return {
        "id": rid,
        "image": image,
        "skill": "caption",
        "level": "easy",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the board."},
            {"from": "gpt", "value": ", ".join(parts) + "."},
        ],
    }


def _summarise(records: list[dict]) -> dict:
    skills: dict = {s: {lv: 0 for lv in LEVELS} for s in SKILLS}
    for rec in records:
        level = skills.setdefault(rec["skill"], {})
        level[rec["level"]] = level.get(rec["level"], 0) + 1
    return {"records": len(records), "images": len({r["image"] for r in records}), "skills": skills}


def generate(cfg: SynthConfig) -> dict:
    """Write ``train.json``, ``test.json`` and ``images/`` under ``cfg.out``; return per-split counts."""
    _validate(cfg)
    out = Path(cfg.out)
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    # Images left by an earlier, larger run would otherwise sit next to JSON that no longer names them.
    for old in image_dir.iterdir():
        if _STALE_IMAGE.fullmatch(old.name):
            old.unlink()
    summary: dict = {"out": str(out), "seed": cfg.seed, "splits": {}}
    for split, n_records in (("train", cfg.train), ("test", cfg.test)):
        records = _generate_split(cfg, split, n_records, image_dir)
        (out / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
        summary["splits"][split] = _summarise(records)
    return summary
