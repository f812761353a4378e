"""Exporting a trained VLM as a plain checkpoint of its own family (loading one: :mod:`vlsi.model.loading`).

The exported student must load with the stock Hugging Face class and nothing else, so LoRA
adapters are merged and the files are the ordinary ``save_pretrained`` ones plus the processor.
Training keeps fp32 master weights; LoRA is merged into them in fp32, and the export is then written
in the dtype of the checkpoint training started from (weights and ``config.json``), so a bf16 2B
student exports as 4.4 GB of bf16, not 8.8 GB of fp32 that ``dtype="auto"`` loaders would then run in.
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


def checkpoint_dtype(name: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint's ``config.json`` declares (``dtype``, or the older ``torch_dtype``); None when
    it declares none."""
    from transformers import AutoConfig

    from vlsi.model.loading import resolve_model

    dtype = getattr(AutoConfig.from_pretrained(resolve_model(name)), "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _cast_state(model: torch.nn.Module, dtype: torch.dtype | None) -> dict | None:
    """``model``'s state dict on the CPU with floating tensors in ``dtype``; None when nothing would change.
    Tensors that share storage (tied embeddings and head) stay shared, so ``save_pretrained`` still writes
    them once."""
    state = model.state_dict()
    if dtype is None or all(v.dtype == dtype for v in state.values() if v.is_floating_point()):
        return None
    cast: dict[tuple, torch.Tensor] = {}
    out = {}
    for key, value in state.items():
        memo = (value.data_ptr(), tuple(value.shape), tuple(value.stride()), value.dtype)
        if memo not in cast:
            target = dtype if value.is_floating_point() else value.dtype
            cast[memo] = value.detach().to("cpu", target)
        out[key] = cast[memo]
    return out


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """``save_pretrained`` names the dtype of the module's parameters (fp32), not of the tensors it was
    given: the saved config, and each sub-config that names one, get ``dtype``."""
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    config["dtype"] = name
    for value in config.values():
        if isinstance(value, dict) and "dtype" in value:
            value["dtype"] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_checkpoint(
    model, processor, out: str | Path, extra: dict | None = None, dtype: torch.dtype | None = None
) -> Path:
    """Writes ``model`` (LoRA merged in its own dtype) and ``processor`` to ``out`` atomically; the weights
    and config in ``dtype`` (None: as the model holds them). ``model`` itself is not changed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap_for_export(model)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        state = _cast_state(model, dtype)
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state)
        if state is not None:
            _set_config_dtype(tmp / "config.json", dtype)
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
