import pytest
import torch

from mebt.model import MeBT, MeBTConfig

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
