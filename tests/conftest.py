"""Shared fixtures: the tiny models and a small synthetic dataset, built once per test session."""

from __future__ import annotations

import pytest

from vlsi.synth import SynthConfig, generate
from vlsi.tiny import TinyConfig, build_tiny


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
    from vlsi.processing import VLProcessor

    return VLProcessor.from_pretrained(tiny_models["teacher"])
