import json

import pytest
import torch

from benchmarks import generation, train_scaling


def test_train_scaling_quick_writes_consistent_json(tmp_path, capsys):
    path = tmp_path / "train.json"
    returned = train_scaling.main(["--quick", "--iters", "2", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(returned))
    [result] = returned["runs"]   # --quick: one thread, one table
    assert result["benchmark"] == "train_scaling" and result["width"] == "quick" and result["threads"] == 1
    assert [r["tokens"] for r in result["rows"]] == [256, 512]
    for row in result["rows"]:
        for model in ("mebt", "full"):
            assert row[model]["ms"] > 0 and row[model]["saved_mib"] > 0 and row[model]["iters"] >= 1
            assert row[model]["ms"] <= row[model]["ms_median"]   # min / median of the interleaved steps
        assert row["time_ratio"] == pytest.approx(row["full"]["ms"] / row["mebt"]["ms"])
        assert row["mem_ratio"] == pytest.approx(row["full"]["saved_mib"] / row["mebt"]["saved_mib"])
    first, last = result["rows"][0], result["rows"][-1]
    assert result["mebt_time_scaling"] == pytest.approx(last["mebt"]["ms"] / first["mebt"]["ms"])
    out = capsys.readouterr().out
    assert "time ratio" in out and "target >= 4" in out


def test_train_scaling_full_attention_saves_more_activations_than_mebt(tmp_path):
    # Deterministic (sizes, not times): full attention keeps N-sized activations in every layer.
    result = train_scaling.main(["--quick", "--iters", "1", "--tokens", "512"])
    row = result["runs"][0]["rows"][0]
    assert row["full"]["saved_mib"] > row["mebt"]["saved_mib"]


def test_train_scaling_rejects_tokens_off_the_grid():
    with pytest.raises(SystemExit):
        train_scaling.main(["--quick", "--tokens", "300"])


def test_generation_quick_times_every_method_interleaved_and_writes_consistent_json(tmp_path, capsys):
    path = tmp_path / "gen.json"
    presets = ["sky_16f", "ucf_16f", "sky_128f"]
    before = torch.get_num_threads()
    returned = generation.main(["--quick", "--presets", *presets, "--batch-sizes", "1", "2", "--threads", "1", "2",
                                "--repeats", "2", "--json", str(path)])
    assert torch.get_num_threads() == before           # the thread counts are not left behind
    assert json.loads(path.read_text()) == json.loads(json.dumps(returned))
    assert returned["benchmark"] == "generation" and [r["threads"] for r in returned["runs"]] == [1, 2]
    for result in returned["runs"]:
        assert result["load_before"] >= 0 and result["load_after"] >= 0 and result["repeats"] == 2
        assert [(r["preset"], r["batch"]) for r in result["rows"]] == [(p, b) for p in presets for b in (1, 2)]
        for row in result["rows"]:
            methods = row["methods"]
            assert set(methods) == {"mebt official", "mebt exact", "AR"} | (
                {"mebt 1-pass bootstrap", "AR 16f window"} if row["preset"] == "sky_128f" else set())
            for m in methods.values():
                assert len(m["seconds"]["runs"]) == 2 and m["seconds"]["min"] == min(m["seconds"]["runs"])
                assert m["samples_per_s"] == pytest.approx(row["batch"] / m["seconds"]["min"])
                assert m["flops_per_sample"] > 0
            assert methods["AR"]["passes"] == row["tokens"] == row["grid"][0] * row["grid"][1] * row["grid"][2]
            assert methods["mebt exact"]["passes"] == methods["mebt official"]["passes"]
            # Counted, not timed: the exact fixes skip work, one-pass bootstrap skips 63 passes.
            assert methods["mebt exact"]["flops_per_sample"] < methods["mebt official"]["flops_per_sample"]
            assert row["exact_speedup"] == pytest.approx(methods["mebt official"]["seconds"]["min"]
                                                         / methods["mebt exact"]["seconds"]["min"])
            if row["preset"] == "sky_128f":
                one = methods["mebt 1-pass bootstrap"]
                assert one["passes"] == methods["mebt exact"]["passes"] - 63
                assert one["flops_per_sample"] < methods["mebt exact"]["flops_per_sample"]
    by_name = {r["preset"]: r for r in returned["runs"][0]["rows"]}
    assert by_name["sky_128f"]["tokens"] > by_name["sky_16f"]["tokens"]
    passes = {name: row["methods"]["mebt official"]["passes"] for name, row in by_name.items()}
    assert passes["ucf_16f"] > passes["sky_16f"]
    out = capsys.readouterr().out
    assert "target >= 10" in out and "--- 2 thread(s), load average" in out and "min / med" in out
