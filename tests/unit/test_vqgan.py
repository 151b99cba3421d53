"""The TATS VQGAN tokenizer: strict loading of real checkpoint layouts, shapes, chunking, codebook maths."""
import argparse
import hashlib
from pathlib import Path

import pytest
import torch

import mebt.tokenizer.vqgan as vqgan
from mebt.errors import ConfigError
from mebt.safe_unpickle import RECORDS_PICKLE_MODULE
from mebt.tokenizer.checkpoint import TokenizerError, load_tokenizer, read_checkpoint, save_tokenizer, tokenizer_sha256
from mebt.tokenizer.vqgan import VQGAN, Codebook, SamePadConv3d, SamePadConvTranspose3d, VQGANConfig, same_padding

DATA = Path(__file__).resolve().parents[1] / "data"
# Every TATS VQGAN builds pre_vq_conv (encoder width -> embedding_dim, 1x1x1), but the vendored layout files
# do not list it, so the fabricated checkpoints add it; the test below shows the bare layout is refused.
PRE_VQ = {"pre_vq_conv.conv.weight": [256, 256, 1, 1, 1], "pre_vq_conv.conv.bias": [256]}


def read_layout(norm: str) -> dict:
    layout = {}
    for line in (DATA / f"tats_vqgan_4x8x8_{norm}norm_state_dict.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            layout[key] = [int(s) for s in shape.strip("[]").split(",") if s.strip()]
    return layout


def fabricate(layout: dict) -> dict:
    """Zero tensors of the listed shapes; stride-0 views, so the 16384-entry codebook costs nothing to save."""
    return {k: torch.zeros((), dtype=torch.long) if k.endswith("num_batches_tracked") else torch.zeros(()).expand(shape)
            for k, shape in layout.items()}


def tats_args(**overrides) -> argparse.Namespace:
    """The hyperparameters TATS pickles (model fields plus training-only ones the loader must ignore)."""
    args = dict(embedding_dim=256, n_codes=16384, n_hiddens=32, downsample=[4, 8, 8], image_channels=3,
                norm_type="group", padding_type="replicate", no_random_restart=False, restart_thres=1.0,
                sequence_length=16, resolution=128, sample_every_n_frames=1, lr=3e-4, disc_channels=64,
                disc_layers=3, discriminator_iter_start=50000, disc_loss_type="hinge", image_gan_weight=1.0,
                video_gan_weight=1.0, l1_weight=4.0, gan_feat_weight=4.0, perceptual_weight=4.0)
    args.update(overrides)
    return argparse.Namespace(**args)


def save_lightning(path: Path, state_dict: dict, args, **extra) -> Path:
    torch.save({"epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.5.4", "state_dict": state_dict,
                "optimizer_states": [], "lr_schedulers": [], "hyper_parameters": {"args": args}, **extra}, path)
    return path


def small_cfg(**overrides) -> VQGANConfig:
    kwargs = dict(n_hiddens=8, num_groups=8, downsample=(2, 4, 4), n_codes=32, embedding_dim=16)
    kwargs.update(overrides)
    return VQGANConfig(**kwargs)


def small_model(**overrides) -> VQGAN:
    torch.manual_seed(0)
    return VQGAN(small_cfg(**overrides)).eval()


class Unlisted:
    """A class no allow-list knows: a file holding one is read by the restricted unpickler."""


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_real_tats_layouts_load_strictly(tmp_path, norm):
    layout = {**read_layout(norm), **PRE_VQ}
    state = fabricate(layout)
    state["post_vq_conv.conv.bias"] = torch.arange(256.0)
    path = save_lightning(tmp_path / "vqgan.ckpt", state, tats_args(norm_type=norm))
    model = load_tokenizer(path)
    assert model.cfg == VQGANConfig(norm_type=norm)
    ignored = ("image_discriminator.", "video_discriminator.", "perceptual_model.")
    assert set(model.state_dict()) == {k for k in layout if not k.startswith(ignored)}
    assert torch.equal(model.post_vq_conv.conv.bias, torch.arange(256.0))
    norm_cls = torch.nn.GroupNorm if norm == "group" else torch.nn.BatchNorm3d
    assert isinstance(model.encoder.conv_blocks[0].res.norm1, norm_cls)
    assert not model.training and model.codebook.initialized


def test_tats_namespace_is_allow_listed_not_unpickled_freely(tmp_path, monkeypatch):
    path = save_lightning(tmp_path / "vqgan.ckpt", fabricate({**read_layout("group"), **PRE_VQ}), tats_args())
    modes = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: modes.append((k["weights_only"], k.get("pickle_module")))
                        or real_load(*a, **k))
    load_tokenizer(path)
    assert modes == [(True, None), (True, None)]  # plain weights-only, then with argparse.Namespace allowed

    modes.clear()
    save_lightning(path, fabricate({**read_layout("group"), **PRE_VQ}), tats_args(), callbacks={"x": Unlisted()})
    assert load_tokenizer(path).cfg == VQGANConfig()
    # Other objects: the restricted unpickler, never torch's unrestricted one; they stay inert records.
    assert modes == [(True, None), (True, None), (False, RECORDS_PICKLE_MODULE)]
    assert read_checkpoint(path)["callbacks"]["x"].pickled_global == f"{__name__}.Unlisted"


def test_bare_tsv_layout_is_refused_for_lacking_pre_vq_conv(tmp_path):
    path = save_lightning(tmp_path / "vqgan.ckpt", fabricate(read_layout("group")), tats_args())
    with pytest.raises(TokenizerError, match=r"is missing keys 'pre_vq_conv.conv.weight', 'pre_vq_conv.conv.bias'"):
        load_tokenizer(path)


def test_missing_unexpected_and_misshaped_keys_are_named_in_one_line(tmp_path):
    state = fabricate({**read_layout("batch"), **PRE_VQ})
    del state["decoder.conv_last.conv.bias"]
    state["encoder.extra.weight"] = torch.zeros(3)
    state["codebook.N"] = torch.zeros(1024)
    path = save_lightning(tmp_path / "vqgan.ckpt", state, tats_args(norm_type="batch"))
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(path)
    msg = str(info.value)
    assert "\n" not in msg and f"tokenizer checkpoint '{path}'" in msg
    assert "is missing key 'decoder.conv_last.conv.bias'" in msg
    assert "has unexpected key 'encoder.extra.weight'" in msg
    assert "'codebook.N' of shape [1024] where [16384] is expected" in msg


def test_absent_unreadable_and_foreign_files(tmp_path):
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(missing)
    assert str(info.value) == (f"tokenizer checkpoint '{missing}' does not exist; pass a TATS VQGAN .ckpt or "
                               "train one with `mebt tokenizer train`")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(TokenizerError, match="could not be read by torch.load"):
        load_tokenizer(garbage)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(TokenizerError, match="has no 'state_dict' mapping"):
        load_tokenizer(plain)
    bad_args = save_lightning(tmp_path / "bad.ckpt", {}, tats_args(downsample=[3, 8, 8]))
    with pytest.raises(TokenizerError, match="unusable hyperparameters: config key 'downsample' must be three powers"):
        load_tokenizer(bad_args)


def test_own_tokenizer_file_round_trips_with_weights_only(tmp_path):
    model = small_model(norm_type="batch")
    model.train()(torch.rand(2, 3, 4, 16, 16) - 0.5)  # move BatchNorm statistics and the codebook off their init
    model.eval()
    path = tmp_path / "sub" / "tokenizer.ckpt"
    save_tokenizer(model, path, extra={"step": 7, "psnr": 30.5})
    raw = torch.load(path, weights_only=True)
    assert raw["step"] == 7 and raw["hyper_parameters"]["args"]["downsample"] == [2, 4, 4]
    loaded = load_tokenizer(path)
    assert loaded.cfg == model.cfg
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    video = torch.rand(1, 3, 4, 16, 16) - 0.5
    assert torch.equal(loaded.encode(video), model.encode(video))
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.ckpt"]  # no temporary file left behind
    assert tokenizer_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(TokenizerError, match="reserved"):
        save_tokenizer(model, path, extra={"state_dict": {}})


def test_encode_and_decode_shapes_of_a_4x8x8_tokenizer(tmp_path):
    # A TATS-layout file of a small 4x8x8 model (full width would cost seconds of compute for the same check).
    torch.manual_seed(0)
    source = VQGAN(VQGANConfig(n_hiddens=8, norm_type="batch", n_codes=64, embedding_dim=16))
    path = save_lightning(tmp_path / "small.ckpt", source.state_dict(),
                          tats_args(n_hiddens=8, norm_type="batch", n_codes=64, embedding_dim=16))
    model = load_tokenizer(path)
    codes = model.encode(torch.rand(1, 3, 16, 128, 128) - 0.5)
    assert codes.shape == (1, 4, 16, 16) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 64
    assert model.decode(codes[:, :2, :4, :4]).shape == (1, 3, 8, 32, 32)
    assert model.latent_shape(16, 128, 128) == (4, 16, 16)
    with pytest.raises(ValueError, match="multiples of the tokenizer's downsample factors"):
        model.encode(torch.zeros(1, 3, 6, 128, 128))


def test_chunked_encoding_equals_encoding_each_chunk_alone_not_the_whole_video():
    model = small_model()
    video = torch.rand(2, 3, 16, 16, 16) - 0.5
    assert torch.equal(model.encode_chunked(video, 16), model.encode(video))
    assert torch.equal(model.encode_chunked(video, 99), model.encode(video))
    # max_frames 7 rounds down to chunks of 6 (a multiple of the temporal factor 2): 6 + 6 + 4 frames.
    chunked = model.encode_chunked(video, 7)
    alone = torch.cat([model.encode(video[:, :, s:e]) for s, e in [(0, 6), (6, 12), (12, 16)]], dim=1)
    assert torch.equal(chunked, alone) and chunked.shape == (2, 8, 4, 4)
    # The documented difference: next to a chunk border the convolutions saw other frames in the whole video.
    with torch.no_grad():
        whole = model.pre_vq_conv(model.encoder(video))
        first = model.pre_vq_conv(model.encoder(video[:, :, :6]))
    assert not torch.allclose(whole[:, :, 2], first[:, :, 2], atol=1e-4)
    decoded = model.decode_chunked(chunked, 7)
    parts = [model.decode(chunked[:, s:e]) for s, e in [(0, 3), (3, 6), (6, 8)]]
    assert torch.allclose(decoded, torch.cat(parts, dim=2), atol=1e-6) and decoded.shape == (2, 3, 16, 16, 16)
    assert torch.equal(model.decode_chunked(chunked, 16), model.decode(chunked))
    with pytest.raises(ValueError, match="at least the temporal downsample factor 2"):
        model.encode_chunked(video, 1)


def test_nearest_neighbour_matches_brute_force_in_slices(monkeypatch):
    torch.manual_seed(0)
    book = Codebook(50, 8)
    flat = torch.randn(333, 8)
    expected = torch.cdist(flat, book.embeddings).argmin(1)
    assert torch.equal(book.nearest(flat), expected)
    monkeypatch.setattr(vqgan, "_DISTANCE_ELEMENTS", 50 * 7)  # 7 rows per slice
    assert torch.equal(book.nearest(flat), expected)
    entries = book.embeddings[[3, 41, 0]]
    assert book.nearest(entries).tolist() == [3, 41, 0]


def test_quantize_forward_straight_through_and_no_update_in_eval():
    torch.manual_seed(0)
    book = Codebook(16, 4).eval()
    before = book.embeddings.clone()
    z = torch.randn(2, 4, 1, 3, 3, requires_grad=True)
    out = book(z)
    idx = out["encodings"]
    assert idx.shape == (2, 1, 3, 3)
    assert torch.allclose(out["embeddings"], before[idx].permute(0, 4, 1, 2, 3))
    out["embeddings"].sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # the decoder's gradient passes the quantiser unchanged
    expected_commit = 0.25 * ((z.detach() - before[idx].permute(0, 4, 1, 2, 3)) ** 2).mean()
    assert torch.allclose(out["commitment_loss"], expected_commit)
    assert torch.equal(book.embeddings, before) and not book.initialized


def test_first_training_batch_initialises_the_codebook_from_data():
    torch.manual_seed(0)
    vectors = torch.randn(8, 2)
    book = Codebook(4, 2)
    book.init_from(vectors)  # 8 vectors >= 4 codes: entries are distinct encoder outputs, without noise
    assert all(any(torch.equal(e, v) for v in vectors) for e in book.embeddings)
    assert len({tuple(e.tolist()) for e in book.embeddings}) == 4
    assert torch.equal(book.z_avg, book.embeddings) and torch.equal(book.N, torch.ones(4))
    fresh = Codebook(4, 2).train()
    fresh(torch.randn(1, 2, 2, 2, 2))
    assert fresh.initialized
    assert fresh.N.sum().item() == pytest.approx(4 * 0.99 + 0.01 * 8)  # init to 1, then one EMA step of 8 vectors


def ema_book(restart: bool) -> Codebook:
    book = Codebook(3, 2, restart_thres=1.0, random_restart=restart).train()
    book.embeddings.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 5.0]]))
    book.N.copy_(torch.tensor([2.0, 2.0, 0.5]))   # code 2 is dead (below restart_thres 1.0)
    book.z_avg.copy_(book.embeddings * book.N[:, None])
    book.initialized = True
    return book


def test_ema_update_follows_the_assigned_means():
    book = ema_book(restart=False)
    flat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [11.0, 9.0]])
    book.update(flat, torch.tensor([0, 0, 1]))
    n = torch.tensor([2.0 * 0.99 + 0.02, 2.0 * 0.99 + 0.01, 0.5 * 0.99])
    z_avg = torch.tensor([[0.01, 0.01], [20 * 0.99 + 0.11, 20 * 0.99 + 0.09], [-5 * 0.99, 2.5 * 0.99]])
    assert torch.allclose(book.N, n) and torch.allclose(book.z_avg, z_avg)
    smoothed = (n + 1e-7) / (n.sum() + 3e-7) * n.sum()
    assert torch.allclose(book.embeddings, z_avg / smoothed[:, None])
    assert torch.allclose(book.embeddings[2], torch.tensor([-10.0, 5.0]))  # an unused code keeps its place


def test_dead_codes_restart_at_batch_vectors():
    torch.manual_seed(0)
    book = ema_book(restart=True)
    flat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [11.0, 9.0], [7.0, 7.0]])
    book.update(flat, torch.tensor([0, 0, 1, 1]))
    live = book.z_avg[:2] / ((book.N[:2] + 1e-7) / (book.N.sum() + 3e-7) * book.N.sum())[:, None]
    assert torch.allclose(book.embeddings[:2], live)
    assert any(torch.equal(book.embeddings[2], row) for row in flat)  # 4 vectors >= 3 codes: no noise added


def test_loaded_codebook_is_not_reinitialised_by_training():
    model = small_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["codebook.embeddings"] = torch.randn(32, 16)
    model.load_state_dict(state)
    assert model.codebook.initialized
    z = torch.randn(1, 16, 1, 2, 2)
    model.codebook.train()(z)
    assert model.codebook.N.sum() == pytest.approx(0.01 * 4)  # one EMA step from the loaded zero counts


def test_same_padding_keeps_sizes_exact():
    assert same_padding((4, 4, 4), (2, 2, 2)) == (1, 1, 1, 1, 1, 1)
    assert same_padding((4, 4, 4), (1, 2, 2)) == (1, 1, 1, 1, 2, 1)  # odd total: the extra pixel goes in front
    assert same_padding((3, 3, 3), (1, 1, 1)) == (1, 1, 1, 1, 1, 1)
    x = torch.randn(1, 2, 3, 4, 4)
    assert SamePadConv3d(2, 2, 4, stride=(1, 2, 2))(x).shape == (1, 2, 3, 2, 2)
    assert SamePadConvTranspose3d(2, 2, 4, stride=(1, 2, 2))(x).shape == (1, 2, 3, 8, 8)
    assert SamePadConvTranspose3d(2, 2, 4, stride=2)(x).shape == (1, 2, 6, 8, 8)


def test_forward_returns_losses_and_training_moves_the_codebook():
    model = small_model().train()
    video = torch.rand(2, 3, 4, 16, 16) - 0.5
    recon, losses = model(video)
    assert recon.shape == video.shape
    assert torch.allclose(losses["recon_loss"], (recon - video).abs().mean())
    assert losses["commitment_loss"] > 0 and 1 <= losses["perplexity"] <= 32
    (losses["recon_loss"] + losses["commitment_loss"]).backward()
    assert model.encoder.conv_first.conv.weight.grad.abs().sum() > 0
    assert model.codebook.initialized


@pytest.mark.parametrize("overrides, key", [
    (dict(downsample=(4, 6, 8)), "downsample"),
    (dict(downsample=(1, 1, 1)), "downsample"),
    (dict(n_hiddens=8), "n_hiddens"),          # 16 channels cannot form 32 GroupNorm groups
    (dict(n_codes=0), "n_codes"),
    (dict(restart_thres=-1.0), "restart_thres"),
])
def test_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'") as info:
        VQGANConfig(**overrides)
    assert "\n" not in str(info.value)
