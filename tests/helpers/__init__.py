"""Helpers shared by the test modules (plain functions and constants; fixtures live in the conftest files)."""
import os
from pathlib import Path

import pytest

from mebt.core.model import MeBTConfig

ROOT = Path(__file__).resolve().parents[2]   # the repository
TESTS = ROOT / "tests"
DATA = TESTS / "data"                          # checkpoint layouts copied from shared/reference/


def tiny_config(**overrides) -> MeBTConfig:
    kwargs = dict(vocab_size=24, latent_shape=(2, 4, 4), n_layer=4, n_embd=32, n_head=4, n_latent=8)
    kwargs.update(overrides)
    return MeBTConfig(**kwargs)


CODES_GRID = (2, 4, 4)


# Fetched by tests/fetch_test_deps.sh (which `make test` runs first): real videos and a jax reference env.
TEST_DEPS = Path(os.environ.get("MEBT_TEST_DEPS") or Path.home() / ".cache" / "mebt" / "test-deps")


def fetched_dep(*parts: str) -> Path:
    """A path under the fetched test dependencies; a clear failure (never a skip) when it is absent."""
    path = TEST_DEPS.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} is missing: run `bash tests/fetch_test_deps.sh` (make test does) first")
    return path
