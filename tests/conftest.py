"""Shared fixtures: tiny weights built once per session, the in-process reference pipeline."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    from minigpt5.weights.tiny import build_tiny_weights
    return build_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny", seed=0)


@pytest.fixture(scope="session")
def reference_pipeline(tiny_weights):
    from minigpt5.pipeline import MiniGPT5Pipeline
    return MiniGPT5Pipeline(tiny_weights, device="cpu")
