"""Shared fixtures: the tiny models and a small synthetic dataset, built once per test session."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from vlsi.data.synth import SynthConfig, generate
from vlsi.model.tiny import TinyConfig
from vlsi.model.tiny_models import build_tiny

# The tiny models' ops are far too small to gain from a second thread. On a quiet 2-core machine the thread
# count makes no difference; with another job on one core, torch's default of two threads made these tests
# 1.7-2.4x slower (test_cli, test_chunked and test_backbone: 16-23 s instead of 9.5 s).
torch.set_num_threads(1)

# Built inputs (vlsi.data.store) go to a folder of this session, not the user's datasets cache; subprocesses
# inherit it.
os.environ.setdefault("VLSI_DATA_CACHE", tempfile.mkdtemp(prefix="vlsi-data-cache-"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    return build_tiny(TinyConfig(out=str(tmp_path_factory.mktemp("tiny"))))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out=str(out), train=48, test=16, seed=3))
    return out


@pytest.fixture(scope="session")
def processor(tiny_models):
    from vlsi.data.processing import VLProcessor

    return VLProcessor.from_pretrained(tiny_models["teacher"])


@pytest.fixture(scope="session")
def verbalizers(tiny_models, tmp_path_factory):
    """Untrained verbalizers (= the logit lens) on every layer but the last of each tiny model: enough to
    drive the matching and the losses of step 2."""
    import torch

    from vlsi.model.backbone import Backbone
    from vlsi.model.loading import load_model
    from vlsi.model.verbalizer import base_model_info, build_verbalizers

    root = tmp_path_factory.mktemp("verbalizers")
    paths = {}
    for name in ("teacher", "student"):
        backbone = Backbone(load_model(tiny_models[name], dtype=torch.float32))
        layers = list(range(backbone.num_layers - 1))
        paths[name] = build_verbalizers(backbone, layers).save(root / name, base_model_info(backbone))
    return paths


# Each family's tiny pair for the per-family tests: the smallest sizes the families accept with the
# built-in image pipeline, so a step takes well under a second.
FAMILY_SIZES = {
    "vision_dim": 32,
    "vision_depth": 2,
    "teacher": {
        "hidden_size": 32,
        "num_layers": 4,
        "num_heads": 2,
        "num_kv_heads": 1,
        "intermediate_size": 64,
    },
    "student": {
        "hidden_size": 16,
        "num_layers": 2,
        "num_heads": 1,
        "num_kv_heads": 1,
        "intermediate_size": 32,
    },
}


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """``family -> {"teacher": path, "student": path}``, each family's pair built on first use."""
    from vlsi.model.tiny import LMSize

    built = {}

    def get(family: str) -> dict:
        if family not in built:
            sizes = dict(FAMILY_SIZES, teacher=LMSize(**FAMILY_SIZES["teacher"]))
            sizes["student"] = LMSize(**FAMILY_SIZES["student"])
            out = tmp_path_factory.mktemp(family)
            built[family] = build_tiny(TinyConfig(out=str(out), family=family, **sizes))
        return built[family]

    return get
