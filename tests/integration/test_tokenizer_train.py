"""Tokenizer training: it learns, it resumes exactly, and bad settings fail with one clear line."""
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from data_pipeline.synthetic_videos import SynthConfig, render_video
from mebt.errors import ConfigError
from mebt.tokenizer.checkpoint import load_tokenizer
from mebt.tokenizer.vqgan import VQGANConfig
from mebt.train.optim import tokenizer_optim
from mebt.train.tokenizer import (
    EpochItems,
    TokenizerLoopConfig,
    TokenizerLossConfig,
    TokenizerTrainConfig,
    batch_indices,
    evaluate,
    psnr_per_clip,
    train_tokenizer,
)


class SynthClips(Dataset):
    """Rendered synthetic videos as {"video": [3, T, H, W] in [-0.5, 0.5]}, the VideoClipDataset item format."""

    def __init__(self, first: int, count: int, frames: int = 8, resolution: int = 16):
        cfg = SynthConfig(num_videos=first + count, frames=frames, resolution=resolution)
        videos = torch.stack([torch.from_numpy(render_video(i, cfg)) for i in range(first, first + count)])
        self.videos = videos.permute(0, 4, 1, 2, 3).float() / 255 - 0.5

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, i):
        return {"video": self.videos[i]}


class CrashAfter(Dataset):
    """Raises on the (n+1)-th item fetched: a training run killed part-way."""

    def __init__(self, inner: Dataset, n: int):
        self.inner, self.left = inner, n

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if self.left == 0:
            raise RuntimeError("simulated crash")
        self.left -= 1
        return self.inner[i]


@pytest.fixture(scope="module")
def clips():
    return SynthClips(0, 24), SynthClips(100, 4)


def tiny_cfg(run_dir, steps=10, **loss) -> TokenizerTrainConfig:
    return TokenizerTrainConfig(
        model=VQGANConfig(n_hiddens=8, num_groups=8, downsample=(2, 4, 4), n_codes=32, embedding_dim=16),
        loss=TokenizerLossConfig(**loss),
        optim=tokenizer_optim(lr=2e-3, betas=(0.9, 0.99), warmup_steps=2),
        train=TokenizerLoopConfig(steps=steps, batch_size=4, ckpt_every=3, log_every=1, eval_clips=4, seed=3,
                                  device="cpu", run_dir=str(run_dir)))


def test_short_training_improves_psnr_and_writes_a_loadable_tokenizer(tmp_path, clips):
    train, held = clips
    result = train_tokenizer(tiny_cfg(tmp_path, steps=40, recon_loss="mse"), train, held)
    assert result["step"] == 40 and len(result["losses"]) == 40
    assert result["psnr"] > result["psnr_start"] + 5, result
    model = load_tokenizer(tmp_path / "tokenizer.ckpt")
    again = evaluate(model, DataLoader(held, batch_size=4), "cpu")
    assert again["psnr"] == pytest.approx(result["psnr"], abs=1e-4)
    assert (tmp_path / "tokenizer_metrics.json").is_file() and (tmp_path / "tokenizer_config.yaml").is_file()


def test_killed_run_resumes_exactly(tmp_path, clips):
    train, held = clips
    # Adversarial terms on from step 2, so discriminators and their optimizer must resume exactly too.
    loss = dict(image_gan_weight=0.5, video_gan_weight=0.5, disc_start=2, disc_channels=8, disc_layers=1)
    whole = train_tokenizer(tiny_cfg(tmp_path / "whole", **loss), train, held)

    # One fetch checks the clip shape, then 4 per step: die while assembling step 8 (last save: step 6).
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_tokenizer(tiny_cfg(tmp_path / "killed", **loss), CrashAfter(train, 1 + 4 * 7 + 1), held)
    assert torch.load(tmp_path / "killed" / "tokenizer_last.ckpt", weights_only=True)["step"] == 6
    resumed = train_tokenizer(tiny_cfg(tmp_path / "killed", **loss), train, held)

    assert resumed["losses"] == whole["losses"]
    assert resumed["psnr"] == whole["psnr"] and resumed["psnr_start"] == whole["psnr_start"]
    a = torch.load(tmp_path / "whole" / "tokenizer.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "killed" / "tokenizer.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_model(tmp_path, clips):
    train, held = clips
    train_tokenizer(tiny_cfg(tmp_path, steps=3), train, held)
    cfg = tiny_cfg(tmp_path, steps=6)
    cfg.model.n_codes = 64
    with pytest.raises(ConfigError, match=r"tokenizer_last.ckpt' was trained with another model or loss: "
                                          r"model.n_codes \(saved 32, now 64\); use another train.run_dir"):
        train_tokenizer(cfg, train, held)


def test_unusable_settings_fail_with_one_line(tmp_path, clips):
    train, held = clips
    with pytest.raises(ConfigError, match="'perceptual_weight' must be 0, got 1.0: the LPIPS perceptual loss"):
        TokenizerLossConfig(perceptual_weight=1.0)
    with pytest.raises(ConfigError, match="'train.eval_clips' \\(4\\) leaves no training clips out of 4"):
        train_tokenizer(tiny_cfg(tmp_path), held)
    with pytest.raises(ConfigError, match=r"'loss.disc_layers' \(3\) is too many for video inputs of size \[8, 16"):
        train_tokenizer(tiny_cfg(tmp_path, video_gan_weight=1.0, disc_layers=3), train, held)
    cfg = tiny_cfg(tmp_path)
    cfg.model.downsample = (4, 8, 8)
    with pytest.raises(ConfigError, match=r"'model.downsample' \[4, 8, 8\] must divide the clips' T, H, W \[6, 16"):
        train_tokenizer(cfg, SynthClips(0, 8, frames=6), held)


def test_batches_are_epoch_permutations_fixed_by_step():
    steps = [batch_indices(s, 4, 10, seed=1) for s in range(5)]  # 20 draws = two epochs of 10
    flat = [index for index, _ in sum(steps, [])]
    assert [epoch for _, epoch in sum(steps, [])] == [0] * 10 + [1] * 10
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]
    assert batch_indices(3, 4, 10, seed=1) == steps[3]
    assert batch_indices(3, 4, 10, seed=2) != steps[3]


class EpochRecorder(Dataset):
    """Like VideoClipDataset(starts='random'): the clip an index gives depends on the epoch set."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"index": i, "epoch": self.epoch}


def test_each_item_is_fetched_at_its_epoch():
    items = EpochItems(Subset(EpochRecorder(), [1, 2, 3]))
    assert len(items) == 3
    assert items[(0, 4)] == {"index": 1, "epoch": 4} and items[(2, 7)] == {"index": 3, "epoch": 7}
    assert EpochItems(SynthClips(0, 2))[(1, 3)]["video"].shape == (3, 8, 16, 16)  # no set_epoch: plain fetch


def test_psnr_is_on_unit_range_pixels_after_clamping():
    video = torch.zeros(2, 3, 2, 4, 4)
    recon = torch.stack([torch.full((3, 2, 4, 4), 0.1), torch.full((3, 2, 4, 4), 0.01)])
    assert psnr_per_clip(recon, video).tolist() == pytest.approx([20.0, 40.0], abs=1e-4)
    assert psnr_per_clip(torch.full_like(video, 3.0), video).tolist() == pytest.approx([6.0206] * 2, abs=1e-3)
