import json
import signal
import subprocess
import sys
import time

import torch

from data_pipeline.synthetic_code_shards import CodeDatasetConfig, write_code_dataset
from data_pipeline.synthetic_codes import SyntheticCodesConfig, uses_data_palette
from mebt.cli import main
from mebt.config import load_config
from mebt.core.model_file import load_model
from mebt.core.sampling import sample
from mebt.train.config import RunConfig
from tests.helpers.engine import communicate_while_progressing


def test_tiny_config_learns_the_procedural_grids(tmp_path):
    """A real (small) DeepSpeed training run of configs/tiny.yaml: from chance to well below it, and sampled
    grids of the exported model keep one background and one object code through the video (random grids
    never do)."""
    cfg = load_config(RunConfig, "configs/tiny.yaml")
    grid, vocab = (4, 8, 8), 8   # the dataset the config's comment describes; the config itself names neither
    write_code_dataset(tmp_path / "codes", CodeDatasetConfig(
        codes=SyntheticCodesConfig(num_samples=2048, sizes=(4, 5)), grid=grid, vocab_size=vocab), progress=False)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "mebt.cli", "train", "--config", "configs/tiny.yaml",
                             f"data.data_dir={tmp_path / 'codes'}", f"train.run_dir={run_dir}", "train.steps=300",
                             "mlflow.enabled=false"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = communicate_while_progressing(proc)   # no wall-time limit: a loaded machine is slow, not stuck
    assert proc.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    chance = torch.log(torch.tensor(8.0)).item()
    late = sum(r["loss"] for r in records[-3:]) / 3   # the mask ratio varies per step: average a few logs
    assert records[0]["loss"] > 0.6 * chance and late < 0.4 * chance
    assert main(["export", str(run_dir), str(tmp_path / "model.pt")]) == 0
    model = load_model(tmp_path / "model.pt").eval()
    assert (model.cfg.latent_shape, model.cfg.vocab_size) == (grid, vocab)   # taken from the dataset
    grids = sample(model, cfg.sampling, 16, generator=torch.Generator().manual_seed(0))
    grids = grids.view(-1, *grid)
    assert sum(uses_data_palette(g, vocab) for g in grids) / len(grids) >= 0.5


def test_cli_rejects_bad_config_with_one_line(tmp_path, capsys):
    assert main(["train", "model.n_layr=4", f"train.run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "mebt: error: unknown config key 'model.n_layr' (did you mean 'model.n_layer'?)"
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written for a rejected config


def test_console_script_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "mebt.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("train", "convert-official", "bench"):
        assert name in out.stdout
    for name in ("train", "convert-official", "bench"):
        sub = subprocess.run([sys.executable, "-m", "mebt.cli", name, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "usage: mebt " + name in sub.stdout


def test_convert_official_cli_writes_a_loadable_model(tmp_path, capsys):
    from mebt.core.model_file import load_model
    from tests.helpers.official import N_HEAD, small_official

    ckpt = tmp_path / "official.ckpt"
    torch.save({"state_dict": small_official()}, ckpt)
    out = tmp_path / "model.pt"
    assert main(["convert-official", str(ckpt), str(out), "--n-head", str(N_HEAD), "--latent-shape", "2", "4", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = load_model(out)
    assert model.cfg.numerics == "official" and model.cfg.latent_shape == (2, 4, 4)
    assert main(["convert-official", str(tmp_path / "missing.ckpt"), str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mebt: error: official MeBT checkpoint") and err.count("\n") == 1
    assert not (tmp_path / "x.pt").exists()


def test_bench_cli_runs_a_benchmark(tmp_path):
    path = tmp_path / "bench.json"
    assert main(["bench", "train-scaling", "--quick", "--json", str(path)]) == 0
    rows = json.loads(path.read_text())["runs"][0]["rows"]
    assert [r["tokens"] for r in rows] == [256, 512]


def test_data_synth_cli_writes_and_resumes(tmp_path, capsys):
    args = ["data", "synth", str(tmp_path), "--num-videos", "3", "--frames", "8", "--resolution", "32"]
    assert main(args) == 0
    assert "3 videos written" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == [f"synth_00000{i}.mp4" for i in range(3)]
    assert main(args) == 0
    assert "0 videos written, 3 already there" in capsys.readouterr().out
    assert main(args[:-1] + ["48"]) == 2
    assert "another config" in capsys.readouterr().err


def test_ctrl_c_in_a_long_job_is_one_line_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "videos"
    cmd = [sys.executable, "-m", "mebt.cli", "data", "synth", str(out), "--num-videos", "400", "--frames", "8",
           "--resolution", "32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.mp4"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("mebt")] == [
        "mebt: interrupted; finished work is kept: run the same command to resume"]
    assert "Traceback" not in err
    kept = len(list(out.glob("*.mp4")))
    assert 2 <= kept < 400
    again = subprocess.run([*cmd[:-6], "--num-videos", str(kept + 1), "--frames", "8", "--resolution", "32"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"1 videos written, {kept} already there" in again.stdout


def test_preprocess_verify_stats_cli_end_to_end(tmp_path, capsys):
    from mebt.tokenizer.checkpoint import save_tokenizer
    from tests.helpers.preprocess import tiny_tokenizer

    videos, out, tok = tmp_path / "videos", tmp_path / "codes", tmp_path / "tok.pt"
    assert main(["data", "synth", str(videos), "--num-videos", "4", "--frames", "8", "--resolution", "32"]) == 0
    save_tokenizer(tiny_tokenizer(seed=0), tok)
    capsys.readouterr()
    args = ["preprocess", str(videos), "--out", str(out), "--tokenizer", str(tok), "--sequence-length", "4",
            "--resolution", "16", "--videos-per-shard", "2", "--no-progress"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["clips"] == 3 * 2 and result["shards_written"] == 2   # 3 train videos x 2 clips of 4 frames
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["shards_already_done"] == 2
    assert main(["data", "verify", str(out)]) == 0
    assert main(["data", "stats", str(out), "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())
    # the training loader streams exactly the preprocessed clips
    from data_pipeline.loader import LoaderConfig, make_loader
    from data_pipeline.shard_format import read_shard

    loader = make_loader(LoaderConfig(data_dir=str(out), batch_size=2, shuffle=False), expect_grid=(2, 4, 4),
                         expect_vocab=32)
    streamed = torch.cat([b["codes"] for b in loader])
    stored = torch.stack([torch.from_numpy(c.astype("int64")) for p in sorted(out.glob("*.tar"))
                          for _, c, _ in read_shard(p)])
    assert streamed.dtype == torch.int64 and torch.equal(streamed, stored)
    shard = sorted(out.glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:700])   # truncate: verify must name it and fail
    capsys.readouterr()
    assert main(["data", "verify", str(out)]) == 1
    assert shard.name in capsys.readouterr().out
    assert main(["preprocess", str(videos), "--out", str(out)]) == 2
    assert "config key 'tokenizer' must be set" in capsys.readouterr().err


def test_tokenizer_train_cli_then_preprocess_with_it(tmp_path, capsys):
    """Synthetic mp4 -> tokenizer training -> preprocess with the trained tokenizer -> verify, all from the CLI."""
    videos, run, out = tmp_path / "videos", tmp_path / "tok", tmp_path / "codes"
    assert main(["data", "synth", str(videos), "--num-videos", "6", "--frames", "8", "--resolution", "32"]) == 0
    assert main(["tokenizer", "train", "--config", "configs/tokenizer_tiny.yaml", f"data.root={videos}",
                 f"train.run_dir={run}", "train.steps=30", "train.eval_clips=2", "train.batch_size=4",
                 "train.ckpt_every=10", "optim.lr=3e-3"]) == 0
    assert "held-out PSNR" in capsys.readouterr().out
    metrics = json.loads((run / "tokenizer_metrics.json").read_text())
    assert metrics["psnr"] > metrics["psnr_start"] + 3
    assert main(["preprocess", str(videos), "--out", str(out), "--tokenizer", str(run / "tokenizer.ckpt"),
                 "--sequence-length", "8", "--resolution", "32", "--no-progress"]) == 0
    assert json.loads((out / "dataset.json").read_text())["grid"] == [4, 8, 8]
    assert main(["data", "verify", str(out)]) == 0
    assert main(["tokenizer", "train", "model.n_cdes=3"]) == 2
    assert "did you mean 'model.n_codes'" in capsys.readouterr().err
