"""Exporting a trained VLM as a plain checkpoint of its own family (loading one: :mod:`vlsi.model.loading`).

The exported student must load with the stock Hugging Face class and nothing else, so LoRA
adapters are merged and the files are the ordinary ``save_pretrained`` ones plus the processor.
Exports are marker-checked: files are written to a temporary folder next to the target and moved
into place one by one, with ``export_complete.json`` removed first and written last, so a folder with
the marker is whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

MARKER = "export_complete.json"


def unwrap_for_export(model) -> torch.nn.Module:
    """Merges LoRA adapters (if any) so the result is the backbone class itself."""
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but export of a plain model must not need it
        return model
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def export_checkpoint(model, processor, out: str | Path, extra: dict | None = None) -> Path:
    """Writes ``model`` (merged) and ``processor`` to ``out`` atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap_for_export(model)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (out / MARKER).unlink(missing_ok=True)
        # Weight shards of an earlier export would otherwise sit beside the new index.
        for stale in [*out.glob("model*.safetensors*"), *out.glob("pytorch_model*.bin*")]:
            stale.unlink()
        for item in tmp.iterdir():
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(item, target)
        (out / MARKER).write_text(json.dumps(extra or {}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_exported(path: str | Path) -> bool:
    return (Path(path) / MARKER).exists()
