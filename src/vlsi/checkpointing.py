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
