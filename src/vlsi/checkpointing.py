"""Crash-safe training checkpoints: atomic writes, last-N retention, refusal of foreign state.

A checkpoint is ``ROOT/step-NNNNNNN/`` holding accelerate's state (trainable weights, optimizer,
scheduler, RNG of every process) and ``state.json`` (step, data position, anything the loop adds,
and the fingerprint of the config that wrote it). It is first written as ``.tmp-step-NNNNNNN`` and
renamed only when complete, so a run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

STATE_FILE = "state.json"


def fingerprint(settings: dict) -> str:
    """A stable hash of the settings that must match for a resume to be exact."""
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


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
            (tmp / STATE_FILE).write_text(json.dumps(dict(state, step=step), indent=2))
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
        if state.get("fingerprint") != expected_fingerprint:
            raise CheckpointMismatch(
                f"{path} was written by a run with different settings or model "
                f"(fingerprint {state.get('fingerprint')} != {expected_fingerprint}); "
                "use a new --out directory or pass --no-resume to start over"
            )
        accelerator.load_state(str(path))
        return state


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(row + "\n" for row in rows))
