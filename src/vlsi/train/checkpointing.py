"""Crash-safe training checkpoints: atomic writes, last-N retention, refusal of foreign state.

A checkpoint is ``ROOT/step-NNNNNNN/`` holding accelerate's state (trainable weights, optimizer,
scheduler, RNG of every process) and ``state.json`` (step, data position, anything the loop adds,
the fingerprint of the config that wrote it with those settings, and the name and shape of every
parameter of the prepared modules). It is first written as ``.tmp-step-NNNNNNN`` and renamed only
when complete, so a run killed mid-write leaves the previous checkpoint intact. A resume is refused,
before any weight is touched, when the settings differ (the message names them) or the model does
(another checkpoint put at the same path).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

STATE_FILE = "state.json"


class Fingerprint(str):
    """The hash of a run's settings, carrying the settings so a refusal can name what changed."""

    settings: dict
    # Settings a checkpoint written before they existed is read with (key -> the value that did what such a
    # run did): its fingerprint lacks them, its settings are completed with these and compared again.
    assumed: dict

    def __new__(cls, settings: dict):
        # Round-tripped through JSON so values compare the same way once read back from state.json.
        plain = json.loads(json.dumps(settings, sort_keys=True, default=str))
        blob = json.dumps(plain, sort_keys=True)
        self = super().__new__(cls, hashlib.sha256(blob.encode()).hexdigest()[:16])
        self.settings = plain
        self.assumed = {}
        return self


def fingerprint(settings: dict) -> Fingerprint:
    """A stable hash of the settings that must match for a resume to be exact."""
    return Fingerprint(settings)


def model_signature(accelerator) -> dict[str, list[int]]:
    """Name -> shape of every parameter of the modules accelerate prepared (whole shapes, also when sharded)."""
    signature = {}
    for i, model in enumerate(accelerator._models):
        for name, p in accelerator.unwrap_model(model).named_parameters():
            # ZeRO-3 leaves an empty placeholder in p and the real shape in ds_shape.
            signature[f"{i}.{name}"] = list(getattr(p, "ds_shape", p.shape))
    return signature


def _diff(saved: dict, now: dict, limit: int = 0, absent: str = "(unset)") -> str:
    """``key: old -> new`` for every key that differs, the first ``limit`` of them (0 = all)."""
    changed = [
        f"{k}: {saved.get(k, absent)!r} -> {now.get(k, absent)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    more = f" and {len(changed) - limit} more" if limit and len(changed) > limit else ""
    return "; ".join(changed[: limit or None]) + more


class CheckpointMismatch(ValueError):
    """A checkpoint written by a run with other settings or another model."""


class CheckpointManager:
    def __init__(self, root: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"--keep-checkpoints must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def checkpoints(self) -> list[Path]:
        if not self.root.exists():
            return []
        done = [p for p in self.root.glob("step-*") if (p / STATE_FILE).exists()]
        return sorted(done, key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, accelerator, step: int, state: dict) -> Path:
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".tmp-step-{step:07d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = dict(state, step=step, model=model_signature(accelerator))
            if isinstance(state.get("fingerprint"), Fingerprint):
                state["settings"] = state["fingerprint"].settings
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def resume_or_reset(self, accelerator, resume: bool, expected_fingerprint: str, logs=()) -> dict | None:
        """The latest checkpoint's state (None if there is none), or, with ``resume`` off, a clean start:
        old checkpoints and logs removed, so they can neither outrank nor mix with the new run's.
        Log rows past the resumed step are dropped: those steps are about to be run again."""
        latest = self.latest() if resume else None
        if latest is None:
            if accelerator.is_main_process:
                shutil.rmtree(self.root, ignore_errors=True)
                for log in logs:
                    Path(log).unlink(missing_ok=True)
            accelerator.wait_for_everyone()
            return None
        state = self.load(accelerator, latest, expected_fingerprint)
        if accelerator.is_main_process:
            for log in logs:
                _truncate_log(Path(log), state["step"])
        return state

    def load(self, accelerator, path: Path, expected_fingerprint: str) -> dict:
        state = json.loads((path / STATE_FILE).read_text())
        advice = "use a new --out directory or pass --no-resume to start over"
        saved = state.get("settings")
        if isinstance(expected_fingerprint, Fingerprint) and saved is not None:
            saved = {**expected_fingerprint.assumed, **saved}  # options newer than the checkpoint
            if (
                state.get("fingerprint") != expected_fingerprint
                and fingerprint(saved) == expected_fingerprint
            ):
                state["fingerprint"] = expected_fingerprint
        if state.get("fingerprint") != expected_fingerprint:
            changed = ""
            if saved is not None and isinstance(expected_fingerprint, Fingerprint):
                changed = f": {_diff(saved, expected_fingerprint.settings)}"
            raise CheckpointMismatch(
                f"{path} was written by a run with different settings or model "
                f"(fingerprint {state.get('fingerprint')} != {expected_fingerprint}){changed}; {advice}"
            )
        if "model" in state and state["model"] != (now := model_signature(accelerator)):
            raise CheckpointMismatch(
                f"{path} was written for another model (same settings and paths, different parameters: "
                f"{_diff(state['model'], now, limit=3, absent='absent')}); {advice}"
            )
        accelerator.load_state(str(path))
        return state


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(row + "\n" for row in rows))
