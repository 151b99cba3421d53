"""The shards this project writes are WebDataset shards: the `webdataset` library itself reads every one and
yields, per sample, exactly the codes and metadata that mebt's own loader yields."""
from __future__ import annotations

import numpy as np
import pytest
import webdataset as wds

from data_pipeline.loader import LoaderConfig, make_loader
from data_pipeline.preprocess import preprocess
from tests.helpers.preprocess import make_config

FIELDS = ("video_id", "split", "source", "start", "stride", "fps")


@pytest.fixture(scope="module")
def preprocessed(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("wds") / "codes"
    preprocess(make_config(data, out))
    return out


def read_with_webdataset(out) -> list[dict]:
    shards = [str(p) for p in sorted(out.glob("*.tar"))]
    assert shards
    dataset = wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode()
    return list(dataset)


def read_with_loader(out) -> dict[str, dict]:
    """One epoch of mebt's loader in manifest order (a fresh loader's ``for`` runs exactly one epoch)."""
    loader = make_loader(LoaderConfig(data_dir=str(out), batch_size=1, shuffle=False, drop_last=False))
    samples = {}
    for batch in loader:
        key = batch["key"][0]
        assert key not in samples, f"{key} yielded twice in one epoch"
        samples[key] = {"codes": batch["codes"][0].numpy(),
                        **{f: batch[f][0] if isinstance(batch[f], list) else batch[f][0].item() for f in FIELDS}}
    assert len(samples) == len(loader)
    return samples


@pytest.mark.parametrize("which", ["preprocess", "synth-codes"])
def test_webdataset_reads_every_sample_the_loader_yields(which, preprocessed, codes_dir):
    out = preprocessed if which == "preprocess" else codes_dir
    ours = read_with_loader(out)
    theirs = read_with_webdataset(out)
    assert len(theirs) == len(ours) > 0
    assert {s["__key__"] for s in theirs} == set(ours)
    for sample in theirs:
        mine = ours[sample["__key__"]]
        codes = sample["codes.npy"]
        assert codes.dtype == np.int16 and codes.ndim == 3   # decoded by webdataset's own npy decoder
        assert np.array_equal(codes.astype(np.int64), mine["codes"]), sample["__key__"]
        meta = sample["json"]
        assert {f: meta[f] for f in FIELDS} == pytest.approx({f: mine[f] for f in FIELDS}), sample["__key__"]
