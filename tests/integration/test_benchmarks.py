import argparse
import json
import os

import pytest
import torch

from benchmarks import generation, gpu_check, pretokenized, train_scaling
from benchmarks.common import thread_counts


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
    returned = generation.main(["--quick", "--presets", *presets, "--batch-sizes", "1", "2", "--threads", "1",
                                "--repeats", "2", "--json", str(path)])
    assert torch.get_num_threads() == before           # the thread count is not left behind
    assert json.loads(path.read_text()) == json.loads(json.dumps(returned))
    assert returned["benchmark"] == "generation" and [r["threads"] for r in returned["runs"]] == [1]
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
    assert "target >= 10" in out and "--- 1 thread(s), load average" in out and "min / med" in out


def test_tables_are_made_at_one_thread_and_all_cores_by_default():
    cpu, quick = torch.device("cpu"), argparse.Namespace(threads=None, quick=True)
    assert thread_counts(argparse.Namespace(threads=None, quick=False), cpu) == sorted({1, os.cpu_count()})
    assert thread_counts(quick, cpu) == [1]
    assert thread_counts(argparse.Namespace(threads=[2, 1, 2], quick=True), cpu) == [2, 1]
    assert len(generation.parse_args(["--quick"]).methods) == 5 and generation.parse_args(["--quick"]).flops


def test_pretokenized_quick_times_the_three_steps_and_estimates_the_paper_size(tmp_path, capsys):
    path = tmp_path / "pre.json"
    saved = pretokenized.main(["--quick", "--repeats", "2", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(saved))
    [result] = saved["runs"]
    assert [r["case"] for r in result["rows"]] == ["codes", "encode + step", "decode + resize + encode + step"]
    for row in result["rows"]:
        assert 0 < row["step_s"]["min"] <= row["step_s"]["median"] and row["cpu_s_per_clip"] > 0
    assert result["rows"][0]["vs_codes"] == 1.0 and result["grid"] == [2, 4, 4]
    # Counted, not timed: the released VQGAN's encoder against the paper MeBT's step, per clip.
    by_frames = {r["frames"]: r for r in result["paper_estimate"]}
    assert 0.05 < by_frames[16]["encode_share"] < by_frames[128]["encode_share"] < 0.2
    assert by_frames[128]["encode_gflop"] == pytest.approx(8 * by_frames[16]["encode_gflop"], rel=0.01)
    assert "CPU-core s / clip" in capsys.readouterr().out


def test_gpu_check_runs_every_section_at_a_tiny_size_into_one_json(tmp_path):
    path = tmp_path / "gpu.json"
    saved = gpu_check.main(["--quick", "--repeats", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(saved))
    [result] = saved["runs"]
    sections = result["sections"]
    assert list(sections) == ["mfu", "train_scaling", "generation", "loader"]
    assert not [name for name, s in sections.items() if "error" in s], sections
    assert [(r["tokens"], r["batch"]) for r in sections["mfu"]["result"]] == [(256, 2), (512, 1)]
    assert all(r["tflops_per_s"] > 0 and r["mfu"] is None for r in sections["mfu"]["result"])   # no peak on CPU
    assert [r["tokens"] for r in sections["train_scaling"]["result"]["rows"]] == [256, 512]
    methods = sections["generation"]["result"]["rows"][1]["methods"]
    assert set(methods) == {"mebt official", "mebt exact", "AR"} and methods["AR"]["flops_per_sample"] is None
    assert sections["loader"]["result"]["rows"][1]["clips_per_s"] > 0
