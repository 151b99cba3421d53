"""`mebt fvd REAL FAKE`: FVD/KVD between any two sets of videos, by the protocols `mebt eval` uses.

Each set is a folder of video files (mp4, webm, avi, mkv, mov, gif) or of ``.npy`` uint8 arrays
[T, H, W, 3], one video per file, taken in sorted file-name order. Frames are resized to 224x224 inside
I3D's preprocessing, each video on its own (not at all when already 224x224), so a set may mix frame
sizes. ``frames`` scores the first F frames of every video; without it all videos must have one length. With several runs the FAKE set
is split into that many equal consecutive parts, each scored against REAL (mean and std reported).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_pipeline.video import VIDEO_EXTENSIONS, read_clip
from mebt.errors import UserError, first_line
from mebt.eval.i3d import MIN_FRAMES, preprocess
from mebt.eval.i3d_weights import load_i3d
from mebt.eval.protocols import fvd_kvd, get_protocol, record
from mebt.fsutil import atomic_write, write_json

log = logging.getLogger(__name__)


class VideoSetError(UserError):
    """A video set that cannot be scored; the message names the file and the fix."""


def list_videos(folder: str | Path) -> list[Path]:
    """The videos of a set in sorted file-name order: video files and ``.npy`` arrays."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoSetError(f"'{folder}' is not a folder: give a folder of video files or .npy uint8 arrays "
                            "[T, H, W, 3]")
    files = sorted(p for p in folder.iterdir() if not p.name.startswith(".")
                   and p.suffix.lower() in (*VIDEO_EXTENSIONS, ".npy"))
    if len(files) < 2:
        raise VideoSetError(f"'{folder}' holds {len(files)} video(s); FVD needs at least 2 per set "
                            f"({', '.join(VIDEO_EXTENSIONS)} or .npy)")
    return files


def read_video(path: Path, frames: int | None = None) -> np.ndarray:
    """uint8 [T, H, W, 3] from a ``.npy`` array or a video file (only its first ``frames`` decoded, when
    given); one-line errors otherwise."""
    if path.suffix.lower() != ".npy":
        return read_clip(path, 0, frames)[0]
    try:
        video = np.load(path, allow_pickle=False)
    except Exception as e:   # damaged or pickled arrays
        raise VideoSetError(f"'{path}' is not a readable .npy array ({first_line(e)})") from None
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise VideoSetError(f"'{path}' holds {video.dtype} {list(video.shape)}; expected uint8 [T, H, W, 3]")
    return video


@torch.no_grad()
def set_features(files: list[Path], frames: int | None, i3d, device, desc: str,
                 batch_size: int = 8) -> tuple[np.ndarray, list]:
    """(I3D features [N, 400] float64, [T, H, W] of each video) of ``files``, ``batch_size`` at a time.

    Every video is resized to 224x224 on its own, so a set may mix frame sizes; all must share T.
    """
    shapes, out = [], []
    with tqdm(total=len(files), desc=desc, unit="video") as bar:
        for start in range(0, len(files), batch_size):
            batch = []
            for path in files[start:start + batch_size]:
                video = read_video(path, frames)
                length = frames or video.shape[0]
                if video.shape[0] < max(length, MIN_FRAMES):
                    raise VideoSetError(f"'{path}' has {video.shape[0]} frames; I3D needs at least "
                                        f"{max(length, MIN_FRAMES)}" + ("" if frames else " (or pass --frames)"))
                if shapes and length != shapes[0][0]:
                    raise VideoSetError(f"mixed shapes: '{path}' has {length} frames, '{files[0]}' "
                                        f"{shapes[0][0]}: pass --frames F to score the first F of every video")
                shapes.append([length, *video.shape[1:3]])
                batch.append(preprocess(video[None, :length]))
            out.append(i3d.features(torch.cat(batch).to(device)).double().cpu().numpy())
            bar.update(len(batch))
    return np.concatenate(out), shapes


def fvd_between(real_dir: str | Path, fake_dir: str | Path, protocol: str = "float64", frames: int | None = None,
                runs: int | None = None, i3d: str | None = None, json_path: str | Path | None = None,
                features_out: str | Path | None = None, device: str = "cpu", batch_size: int = 8) -> dict:
    """FVD/KVD of the videos in ``fake_dir`` against those in ``real_dir``; returns the result record."""
    proto = get_protocol(protocol)
    real_files, fake_files = list_videos(real_dir), list_videos(fake_dir)
    runs = runs or proto.runs or 1
    if proto.runs is not None and runs != proto.runs:
        raise VideoSetError(f"protocol '{protocol}' fixes runs={proto.runs}, but {runs} was given")
    for name, files, want in (("REAL", real_files, proto.num_real),
                              ("FAKE", fake_files, proto.num_samples and proto.num_samples * runs)):
        if want is not None and len(files) != want:
            raise VideoSetError(f"protocol '{protocol}' needs {want} {name} videos, found {len(files)} in "
                                f"'{files[0].parent}'; use --protocol {proto.arithmetic} for other counts")
    if len(fake_files) % runs or len(fake_files) // runs < 2:
        raise VideoSetError(f"{len(fake_files)} FAKE videos cannot be split into {runs} equal runs of at least 2")
    if frames is not None and frames < MIN_FRAMES:
        raise VideoSetError(f"--frames {frames} is too few: I3D needs at least {MIN_FRAMES}")
    network = load_i3d(i3d, numerics=proto.i3d_numerics).to(device)
    log.info(f"FVD/KVD ({protocol} protocol) of {len(fake_files)} FAKE videos in {runs} run(s) against "
             f"{len(real_files)} REAL videos, I3D {network.network['network']}")
    real, real_shapes = set_features(real_files, frames, network, device, "I3D features (real)", batch_size)
    fake, fake_shapes = set_features(fake_files, frames, network, device, "I3D features (fake)", batch_size)
    length = real_shapes[0][0] if frames is None else frames
    if frames is None and fake_shapes[0][0] != length:
        raise VideoSetError(f"REAL videos have {length} frames, FAKE videos {fake_shapes[0][0]}: pass --frames F "
                            "to score the first F of both")
    n = len(fake) // runs
    metrics, per_run = fvd_kvd(real, [fake[r * n:(r + 1) * n] for r in range(runs)], proto, str(length))
    result = {"metrics": metrics, "runs": per_run if runs > 1 else None,
              "protocol": record(proto, network.network, pixels="as stored in the files", frames=int(length),
                                 real=len(real), generated_per_run=n, runs=runs, real_dir=str(real_dir),
                                 fake_dir=str(fake_dir),
                                 real_sizes=sorted({f"{h}x{w}" for _, h, w in real_shapes}),
                                 fake_sizes=sorted({f"{h}x{w}" for _, h, w in fake_shapes}))}
    if features_out:
        folder = Path(features_out)
        for name, feats in (("real", real), ("fake", fake)):
            with atomic_write(folder / f"{name}.npy") as tmp:
                np.save(tmp, feats.astype(np.float32), allow_pickle=False)
        result["features"] = {"real": str(folder / "real.npy"), "fake": str(folder / "fake.npy")}
    if json_path:
        write_json(json_path, result)
    return result
