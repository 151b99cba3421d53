import json

import pytest
import torch

from benchmarks import generation, train_scaling


def test_train_scaling_quick_writes_consistent_json(tmp_path, capsys):
    path = tmp_path / "train.json"
    returned = train_scaling.main(["--quick", "--iters", "2", "--json", str(path)])
    result = json.loads(path.read_text())
    assert result == json.loads(json.dumps(returned))
    assert result["benchmark"] == "train_scaling" and result["width"] == "quick"
    assert [r["tokens"] for r in result["rows"]] == [256, 512]
    for row in result["rows"]:
        for model in ("mebt", "full"):
            assert row[model]["ms"] > 0 and row[model]["saved_mib"] > 0 and row[model]["iters"] >= 1
        assert row["time_ratio"] == pytest.approx(row["full"]["ms"] / row["mebt"]["ms"])
        assert row["mem_ratio"] == pytest.approx(row["full"]["saved_mib"] / row["mebt"]["saved_mib"])
    first, last = result["rows"][0], result["rows"][-1]
    assert result["mebt_time_scaling"] == pytest.approx(last["mebt"]["ms"] / first["mebt"]["ms"])
    out = capsys.readouterr().out
    assert "time ratio" in out and "target >= 4" in out


def test_train_scaling_full_attention_saves_more_activations_than_mebt(tmp_path):
    # Deterministic (sizes, not times): full attention keeps N-sized activations in every layer.
    result = train_scaling.main(["--quick", "--iters", "1", "--tokens", "512"])
    row = result["rows"][0]
    assert row["full"]["saved_mib"] > row["mebt"]["saved_mib"]


def test_train_scaling_rejects_tokens_off_the_grid():
    with pytest.raises(SystemExit):
        train_scaling.main(["--quick", "--tokens", "300"])


def test_generation_quick_writes_consistent_json(tmp_path, capsys):
    path = tmp_path / "gen.json"
    presets = ["sky_16f", "ucf_16f", "sky_128f"]
    before = torch.get_num_threads()
    generation.main(["--quick", "--presets", *presets, "--json", str(path)])
    assert torch.get_num_threads() == before           # --quick's single thread is not left behind
    result = json.loads(path.read_text())
    assert result["benchmark"] == "generation"
    assert [r["preset"] for r in result["rows"]] == presets
    for row in result["rows"]:
        assert row["tokens"] == row["grid"][0] * row["grid"][1] * row["grid"][2]
        assert row["ar"]["passes"] == row["tokens"]
        for model in ("mebt", "ar"):
            assert row[model]["seconds"] > 0 and row[model]["passes"] > 0
        assert row["ratio"] == pytest.approx(row["ar"]["seconds"] / row["mebt"]["seconds"])
    # Presets of one length share a grid (and one autoregressive measurement); the lengths differ.
    by_name = {r["preset"]: r for r in result["rows"]}
    assert by_name["sky_16f"]["ar"] == by_name["ucf_16f"]["ar"]
    assert by_name["sky_128f"]["tokens"] > by_name["sky_16f"]["tokens"]
    assert by_name["ucf_16f"]["mebt"]["passes"] > by_name["sky_16f"]["mebt"]["passes"]
    assert "target >= 10" in capsys.readouterr().out
