import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlsi.data.synth import BACKGROUND, COLOURS, SynthConfig, generate

GRID, CELL = 3, 16
# Written out here rather than imported, so a mix-up in the module's position naming shows up as a
# mismatch against the pixels.
POSITIONS = {
    "the top left": 0,
    "the top middle": 1,
    "the top right": 2,
    "the middle left": 3,
    "the center": 4,
    "the middle right": 5,
    "the bottom left": 6,
    "the bottom middle": 7,
    "the bottom right": 8,
}
NUMBERS = "zero one two three four five six seven eight nine".split()
PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}


def _generate(root: Path, **kw) -> tuple[Path, dict]:
    # Single-question records unless a test asks for the train-time grouping and captions.
    defaults = {"train": 40, "test": 20, "seed": 0, "captions": False, "multi_turn": False}
    cfg = SynthConfig(out=str(root), **{**defaults, **kw})
    return root, generate(cfg)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root, summary = _generate(tmp_path_factory.mktemp("synth"))
    splits = {s: json.loads((root / f"{s}.json").read_text()) for s in ("train", "test")}
    return root, summary, splits


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_board(path: Path) -> list:
    """Recover (colour, shape) per cell from pixels alone, independently of the generator's board."""
    arr = np.asarray(Image.open(path).convert("RGB")).astype(int)
    board = []
    for idx in range(GRID * GRID):
        r, c = divmod(idx, GRID)
        sub = arr[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
        fg = ((sub - np.array(BACKGROUND)) ** 2).sum(-1) > 60**2
        if fg.sum() < 6:
            board.append(None)
            continue
        mean = sub[fg].mean(0)
        colour = min(COLOURS, key=lambda name: ((mean - np.array(COLOURS[name])) ** 2).sum())
        ys, xs = np.nonzero(fg)
        box = fg[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        if box.mean() > 0.9:
            shape = "square"
        elif box[-1].mean() > 0.8:
            shape = "triangle"
        elif box.mean() > 0.65:
            shape = "circle"
        else:
            shape = "cross"
        board.append((colour, shape))
    return board


def _holds(relation: str, a: int, b: int) -> bool:
    (ra, ca), (rb, cb) = divmod(a, GRID), divmod(b, GRID)
    return {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb, "below": ra > rb}[
        relation
    ]


def _find(board: list, desc: str) -> int:
    hits = [i for i, it in enumerate(board) if it and " ".join(it) == desc]
    assert len(hits) == 1, f"{desc!r} is not unique on the board"
    return hits[0]


def solve(question: str, board: list) -> str:
    """Answer a question from the pixel-read board; an independent oracle for the generator's answers."""
    desc = lambda it: " ".join(it)  # noqa: E731
    if m := re.fullmatch(r"What colour is the shape at (.+)\?", question):
        return board[POSITIONS[m[1]]][0]
    if m := re.fullmatch(r"What shape is at (.+)\?", question):
        return board[POSITIONS[m[1]]][1]
    if m := re.fullmatch(r"What is at (.+)\?", question):
        return desc(board[POSITIONS[m[1]]])
    if m := re.fullmatch(r"How many (?:(\w+) )?(\w+) are there\?", question):
        colour, shape = m[1], PLURALS.get(m[2])
        return NUMBERS[sum(1 for it in board if it and colour in (None, it[0]) and shape in (None, it[1]))]
    relation = r"(to the left of|to the right of|above|below)"
    if m := re.fullmatch(rf"Is the (\w+ \w+) {relation} the (\w+ \w+)\?", question):
        return "yes" if _holds(m[2], _find(board, m[1]), _find(board, m[3])) else "no"
    if m := re.fullmatch(rf"What is directly {relation} the (\w+ \w+)\?", question):
        row, col = divmod(_find(board, m[2]), GRID)
        dr, dc = {"to the left of": (0, -1), "to the right of": (0, 1), "above": (-1, 0), "below": (1, 0)}[
            m[1]
        ]
        return desc(board[(row + dr) * GRID + col + dc])
    if question.startswith("What is missing in this pattern?"):
        missing = [i for i, it in enumerate(board) if it is None]
        assert len(missing) == 1 and missing[0] != 0
        period = next(
            p
            for p in (2, 3)
            if all(a is None or b is None or a == b for a, b in zip(board, board[p:], strict=False))
        )
        answer = desc(board[missing[0] - period] if missing[0] >= period else board[missing[0] + period])
        options = dict(re.findall(r"^([A-D])\. (.+)$", question, flags=re.M))
        return next(k for k, v in options.items() if v == answer) if options else answer
    raise AssertionError(f"unrecognised question {question!r}")


def test_same_seed_is_byte_identical_and_seed_matters(dataset, tmp_path):
    root, _, _ = dataset
    again, _ = _generate(tmp_path / "again")
    other, _ = _generate(tmp_path / "other", seed=1)
    first = _files(root)
    assert first == _files(again)
    other_files = _files(other)
    assert other_files["train.json"] != first["train.json"]
    assert sum(other_files[k] != first[k] for k in first if k.endswith(".png")) > len(first) // 2


def test_images_exist_disjoint_and_sized(dataset):
    root, _, splits = dataset
    used = {s: {r["image"] for r in recs} for s, recs in splits.items()}
    assert not used["train"] & used["test"]
    # Distinct content too, not just distinct names: the splits must draw from unrelated random streams.
    content = {s: {(root / p).read_bytes() for p in paths} for s, paths in used.items()}
    assert not content["train"] & content["test"]
    assert all(p.startswith("images/train_") for p in used["train"])
    assert all(p.startswith("images/test_") for p in used["test"])
    on_disk = {p.relative_to(root).as_posix() for p in (root / "images").iterdir()}
    assert on_disk == used["train"] | used["test"]
    for path in on_disk:
        with Image.open(root / path) as im:
            assert im.size == (GRID * CELL, GRID * CELL) and im.mode == "RGB"


def test_llava_format_and_coverage(dataset):
    _, summary, splits = dataset
    for split, recs in splits.items():
        assert len(recs) == summary["splits"][split]["records"] == {"train": 40, "test": 20}[split]
        assert len({r["id"] for r in recs}) == len(recs)
        assert {r["skill"] for r in recs} == {"attribute", "count", "spatial", "pattern"}
        assert {r["level"] for r in recs} == {"easy", "hard"}
        counted = Counter((r["skill"], r["level"]) for r in recs)
        for skill, levels in summary["splits"][split]["skills"].items():
            assert all(counted[skill, lv] == n for lv, n in levels.items())
        for r in recs:
            human, gpt = r["conversations"]
            assert human["from"] == "human" and gpt["from"] == "gpt"
            assert human["value"].startswith("<image>\n") and human["value"].count("<image>") == 1
            assert r["id"].startswith(f"{split}-")
            answer = gpt["value"]
            assert re.fullmatch(r"[A-D]|[a-z]+( [a-z]+)?", answer), answer
            assert not re.search(r"\d", answer)
        by_image = Counter()
        for r in recs:
            by_image[r["image"]] += 1
        assert max(by_image.values()) <= 2
        for image in by_image:
            skills = [r["skill"] for r in recs if r["image"] == image]
            assert len(set(skills)) == len(skills)


def test_answers_match_pixels(dataset):
    root, _, splits = dataset
    boards = {}
    for recs in splits.values():
        for r in recs:
            board = boards.setdefault(r["image"], read_board(root / r["image"]))
            question = r["conversations"][0]["value"].removeprefix("<image>\n")
            assert solve(question, board) == r["conversations"][1]["value"], (r["id"], question, board)


def test_multiple_choice_options(dataset):
    _, _, splits = dataset
    mc = [r for recs in splits.values() for r in recs if r["skill"] == "pattern" and r["level"] == "hard"]
    assert mc
    for r in mc:
        options = re.findall(r"^([A-D])\. (.+)$", r["conversations"][0]["value"], flags=re.M)
        letters, texts = zip(*options, strict=True)
        assert letters == ("A", "B", "C", "D")
        assert len(set(texts)) == 4
        assert r["conversations"][1]["value"] in letters
        assert r["conversations"][0]["value"].endswith("\nAnswer with the letter.")


def test_answer_distributions_are_not_degenerate(tmp_path):
    _, _ = _generate(tmp_path, train=800, test=0)
    recs = json.loads((tmp_path / "train.json").read_text())
    by_skill: dict[str, Counter] = {}
    for r in recs:
        by_skill.setdefault(r["skill"], Counter())[r["conversations"][1]["value"]] += 1
    for skill, answers in by_skill.items():
        assert answers.most_common(1)[0][1] / answers.total() < 0.5, (skill, answers.most_common(3))
    count = by_skill["count"]
    assert 0.05 < count["zero"] / count.total() < 0.25
    yes_no = Counter(
        r["conversations"][1]["value"] for r in recs if r["skill"] == "spatial" and r["level"] == "easy"
    )
    assert set(yes_no) == {"yes", "no"} and abs(yes_no["yes"] - yes_no["no"]) < 0.2 * yes_no.total()
    letters = Counter(
        r["conversations"][1]["value"] for r in recs if r["skill"] == "pattern" and r["level"] == "hard"
    )
    assert set(letters) == set("ABCD")


def test_rerun_in_same_dir_drops_stale_images(tmp_path):
    _generate(tmp_path, train=20, test=6)
    _, summary = _generate(tmp_path, train=6, test=2)
    assert len(list((tmp_path / "images").iterdir())) == sum(s["images"] for s in summary["splits"].values())


@pytest.mark.parametrize("per_image", [1, 3])
def test_other_questions_per_image(tmp_path, per_image):
    root, _ = _generate(tmp_path, train=24, test=0, questions_per_image=per_image)
    recs = json.loads((root / "train.json").read_text())
    assert len(recs) == 24
    per = Counter(r["image"] for r in recs)
    assert set(per.values()) == {per_image}
    for r in recs:
        board = read_board(root / r["image"])
        assert (
            solve(r["conversations"][0]["value"].removeprefix("<image>\n"), board)
            == r["conversations"][1]["value"]
        )


@pytest.mark.parametrize("bad", [{"grid": 2}, {"questions_per_image": 4}, {"train": -1}, {"cell": 4}])
def test_invalid_config(tmp_path, bad):
    with pytest.raises(ValueError):
        _generate(tmp_path, **bad)


def test_train_captions_and_multi_turn_conversations(tmp_path):
    root, _ = _generate(tmp_path, train=24, test=8, captions=True, multi_turn=True)
    train = json.loads((root / "train.json").read_text())
    test = json.loads((root / "test.json").read_text())
    captions = [r for r in train if r["skill"] == "caption"]
    conversations = [r for r in train if r["skill"] != "caption"]
    assert len(captions) == len(conversations) == 12  # 24 questions, 2 per image, one caption each
    for r in conversations:
        turns = r["conversations"]
        assert len(turns) == 4 and [t["from"] for t in turns] == ["human", "gpt"] * 2
        assert sum(t["value"].count("<image>") for t in turns) == 1
        board = read_board(root / r["image"])
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            assert solve(human["value"].removeprefix("<image>\n"), board) == gpt["value"]
    for r in captions:
        board = read_board(root / r["image"])
        described = r["conversations"][1]["value"].rstrip(".").split(", ")
        cells = [f"{c} {s}" for c, s in (item for item in board if item is not None)]
        assert [d.split(" at ")[0] for d in described] == cells
    # The test split stays one question per record, with no captions.
    assert all(len(r["conversations"]) == 2 and r["skill"] != "caption" for r in test)


def test_position_cue_tints_empty_cells_by_row_and_column(tmp_path):
    root, _ = _generate(tmp_path, train=16, test=0, position_cue=16)
    recs = json.loads((root / "train.json").read_text())
    for r in recs:
        board = read_board(root / r["image"])
        question = r["conversations"][0]["value"].removeprefix("<image>\n")
        assert solve(question, board) == r["conversations"][1]["value"]
    # An empty cell's corner pixel shows the cue: green falls by 16 per row, blue by 16 per column.
    checked = 0
    for r in recs:
        arr = np.asarray(Image.open(root / r["image"]).convert("RGB")).astype(int)
        for idx, item in enumerate(read_board(root / r["image"])):
            if item is None:
                row, col = divmod(idx, GRID)
                expected = (BACKGROUND[0], BACKGROUND[1] - 16 * row, BACKGROUND[2] - 16 * col)
                assert tuple(arr[row * CELL, col * CELL]) == expected
                checked += 1
    assert checked > 10
