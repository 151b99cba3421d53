import os

import av
import numpy as np
import pytest
import torch

from mebt.errors import UserError
from mebt.media import side_by_side, tile, to_uint8, write_gif, write_mp4, write_video_grid


def moving_square(n=2, t=6, h=16, w=16, size=6) -> torch.Tensor:
    """[N, 3, T, H, W] in [-0.5, 0.5]: grey background, a pure red square moving right one pixel a frame."""
    v = torch.zeros(n, 3, t, h, w)
    for i in range(t):
        v[:, 0, i, 4:4 + size, i:i + size] = 0.5
        v[:, 1:, i, 4:4 + size, i:i + size] = -0.5
    return v


def read_frames(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_to_uint8_range_layout_and_grey():
    v = torch.tensor([-0.5, 0.5, -1.0, 2.0]).view(1, 1, 1, 1, 4)  # N=1, C=1, T=1, H=1, W=4
    out = to_uint8(v)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 1, 4, 3)
    assert out[0, 0, 0, :, 0].tolist() == [0, 255, 0, 255]  # clamped outside [-0.5, 0.5]
    assert (out[..., 0] == out[..., 2]).all()  # one channel repeated to three
    rgb = torch.zeros(1, 3, 2, 1, 1)
    rgb[0, :, 1] = torch.tensor([0.5, -0.5, 0.0]).view(3, 1, 1)
    assert to_uint8(rgb)[0, 1, 0, 0].tolist() == [255, 0, 128]  # channel c of frame t -> [.., t, h, w, c]


def test_tile_positions_and_even_size():
    n, t, h, w, pad = 5, 2, 3, 5, 2
    frames = np.zeros((n, t, h, w, 3), np.uint8)
    for i in range(n):
        frames[i] = 10 * (i + 1)
    grid = tile(frames, ncols=3, pad=pad)
    gh, gw = 2 * h + pad, 3 * w + 2 * pad  # 8 x 19 before evening
    assert grid.shape == (t, gh, gw + 1, 3)
    for i in range(n):
        r, c = divmod(i, 3)
        y, x = r * (h + pad), c * (w + pad)
        assert (grid[:, y:y + h, x:x + w] == 10 * (i + 1)).all()
        assert (grid[:, y:y + h, x + w:x + w + pad] == 0).all()  # black gap to the right
    assert (grid[:, h + pad:, 2 * (w + pad):] == 0).all()  # the sixth (empty) cell stays black
    assert tile(frames).shape[1:3] == (2 * h + pad, 3 * w + 2 * pad + 1)  # default ncols = ceil(sqrt(5)) = 3


def test_side_by_side_rows():
    real, fake = np.full((2, 1, 4, 4, 3), 50, np.uint8), np.full((2, 1, 4, 4, 3), 200, np.uint8)
    grid = side_by_side(real, fake)
    assert grid.shape == (1, 10, 10, 3)
    assert (grid[:, :4, :4] == 50).all() and (grid[:, 6:, 6:] == 200).all()


def test_mp4_and_gif_round_trip(tmp_path):
    videos = moving_square()
    paths = write_video_grid(videos, tmp_path / "samples", fps=8)
    assert [p.name for p in paths] == ["samples.mp4", "samples.gif"]
    grid = tile(to_uint8(videos))
    mp4, gif = read_frames(paths[0]), read_frames(paths[1])
    assert mp4.shape == grid.shape and gif.shape == grid.shape
    assert np.abs(mp4.astype(int) - grid).mean() < 10
    # the GIF's palette keeps the pure colours exactly (a flat test pattern has few colours)
    assert np.array_equal(gif, grid)
    assert (gif[3, 4:10, 3:9] == [255, 0, 0]).all()
    assert sorted(os.listdir(tmp_path)) == ["samples.gif", "samples.mp4"]  # no temporary file left


def test_odd_sized_mp4_is_padded_and_many_colour_gif_is_close(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (3, 9, 7, 3), dtype=np.uint8)
    assert read_frames(write_mp4(frames, tmp_path / "odd.mp4")).shape == (3, 10, 8, 3)
    smooth = np.broadcast_to(np.linspace(0, 255, 7 * 9).reshape(1, 9, 7, 1), (3, 9, 7, 3)).astype(np.uint8)
    back = read_frames(write_gif(smooth, tmp_path / "ramp.gif"))
    assert back.shape == smooth.shape and np.abs(back.astype(int) - smooth).max() <= 8


def test_unwritable_path_is_a_one_line_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    frames = to_uint8(moving_square(n=1))[0]
    for writer in (write_mp4, write_gif):
        with pytest.raises(UserError) as err:
            writer(frames, blocker / "video.out")
        assert "\n" not in str(err.value) and str(blocker) in str(err.value)
    with pytest.raises(UserError, match="unknown video format 'avi'"):
        write_video_grid(moving_square(n=1), tmp_path / "x", formats=("avi",))


def test_failed_encode_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        write_mp4(np.zeros((0, 4, 4, 3), np.uint8), tmp_path / "empty.mp4")
    assert os.listdir(tmp_path) == []
