"""Official-checkpoint conversion and the portable model file.

Official checkpoints are fabricated: full size with exactly the reference layout (on the meta device,
no memory), and small with random values, checked against a forward pass written here from the
reference description of the official block.
"""
import argparse
import math
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mebt.checkpoint import CheckpointError, load_model, read_model_file, save_model
from mebt.config import ConfigError
from mebt.convert import convert_official_file, convert_official_state_dict
from mebt.model import MeBT

# The official layout (copied from shared/reference/ so the suite runs from any clone).
REFERENCE = Path(__file__).resolve().parent / "data" / "mebt_official_16f_state_dict.tsv"

N_HEAD = 4
LATENT_SHAPE = (2, 4, 4)
PAPER_PLAN_6 = ["latent_enc", "latent_self", "latent_enc", "latent_dec", "lt2l", "latent_dec"]
VQGAN_KEYS = {"first_stage_model.encoder.conv_first.weight": (32, 3, 3, 3, 3),
              "first_stage_model.codebook.embeddings": (16384, 256),
              "first_stage_model.codebook.N": (16384,)}


def read_reference():
    """(layout {key: shape}, layer plan) from the reference tsv."""
    layout, plan = {}, None
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("# layer plan"):
            plan = line.split(":", 1)[1].strip().split(",")
        if not line.strip() or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        layout[key] = tuple(int(s) for s in shape.strip("[]").split(","))
    return layout, plan


def official_layout(vocab, d, n_latent, block_size, n_layer):
    """Key -> shape of an official checkpoint's transformer part, following the reference layout."""
    layout = {"tok_emb.weight": (vocab, d), "mask_emb": (1, 1, d), "sos_emb": (1, n_latent, d),
              "pos_emb": (1, block_size, d)}
    for i in range(n_layer):
        p = f"transformer.blocks.{i}."
        for norm in ("ln1", "ln2"):
            layout.update({f"{p}{norm}.weight": (d,), f"{p}{norm}.bias": (d,)})
        for proj in ("key", "query", "value", "proj"):
            layout.update({f"{p}attn.{proj}.weight": (d, d), f"{p}attn.{proj}.bias": (d,)})
        layout.update({f"{p}mlp.0.weight": (4 * d, d), f"{p}mlp.0.bias": (4 * d,),
                       f"{p}mlp.2.weight": (d, 4 * d), f"{p}mlp.2.bias": (d,)})
    layout.update({"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,),
                   "transformer.head.weight": (vocab, d)})
    return layout


def small_official(seed=0, n_layer=6):
    """A random official state dict: d=32, 4 heads, vocab 24, 8 latents, a 2x4x4 grid."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in official_layout(24, 32, 8, 32, n_layer).items():
        value = 0.2 * torch.randn(shape, generator=g)
        # LayerNorm gains near 1 (as trained ones are), but not exactly 1 so a swapped norm shows.
        sd[key] = value + 1 if ".ln" in key and key.endswith("weight") else value
    return sd


def inputs(seed=1, batch=2, n_ctx=12):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 24, (batch, 32), generator=g)
    perm = torch.stack([torch.randperm(32, generator=g) for _ in range(batch)])
    return codes, perm[:, :n_ctx], perm[:, n_ctx:]


# --- an independent forward of the official model, on the official state dict ---

def _ln(w, p, x):
    return F.layer_norm(x, x.shape[-1:], w[p + ".weight"], w[p + ".bias"])


def _linear(w, p, x):
    return x @ w[p + ".weight"].T + w.get(p + ".bias", 0.0)


def _attention(w, p, q, kv, n_head):
    b, nq, d = q.shape
    split = lambda t: t.reshape(b, t.shape[1], n_head, d // n_head).transpose(1, 2)
    qh, kh, vh = split(_linear(w, p + "query", q)), split(_linear(w, p + "key", kv)), split(_linear(w, p + "value", kv))
    att = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d // n_head), dim=-1)
    return _linear(w, p + "proj", (att @ vh).transpose(1, 2).reshape(b, nq, d))


def _block(w, i, q, kv, n_head):
    p = f"transformer.blocks.{i}."
    # The official quirk: one LayerNorm for query and key inputs, residual onto the normalised query.
    qn, kvn = _ln(w, p + "ln1", q), _ln(w, p + "ln1", kv)
    x = qn + _attention(w, p + "attn.", qn, kvn, n_head)
    return x + _linear(w, p + "mlp.2", F.gelu(_linear(w, p + "mlp.0", _ln(w, p + "ln2", x))))


def reference_logits(w, plan, codes, ctx_idx, tgt_idx, n_head=N_HEAD):
    pos = w["pos_emb"][0]
    ctx = w["tok_emb.weight"][codes.gather(1, ctx_idx)] + pos[ctx_idx]
    tgt = w["mask_emb"][0] + pos[tgt_idx]
    lat = w["sos_emb"].expand(codes.shape[0], -1, -1)
    for i, kind in enumerate(plan):
        if kind == "latent_enc":
            lat = _block(w, i, lat, ctx, n_head)
        elif kind == "latent_self":
            lat = _block(w, i, lat, lat, n_head)
        elif kind == "latent_dec":
            tgt = _block(w, i, tgt, lat, n_head)
        else:
            lat = _block(w, i, lat, torch.cat([lat, tgt], dim=1), n_head)
    return _linear(w, "transformer.head", _ln(w, "transformer.ln_f", tgt))


def converted_model(sd, **kwargs):
    cfg, ours = convert_official_state_dict(sd, n_head=N_HEAD, latent_shape=LATENT_SHAPE, **kwargs)
    model = MeBT(cfg)
    model.load_state_dict(ours, strict=True)
    return model.eval()


# --- full-size layout ---

def test_full_size_official_layout_converts_completely():
    layout, plan = read_reference()
    assert len(layout) == 4 + 24 * 16 + 3
    # The small fabricated checkpoints below follow the same generator, so it must match the reference.
    assert layout == official_layout(16384, 1024, 256, 1024, 24)
    sd = {k: torch.empty(s, device="meta") for k, s in {**layout, **VQGAN_KEYS}.items()}

    cfg, ours = convert_official_state_dict(sd)

    assert (cfg.n_embd, cfg.n_layer, cfg.vocab_size, cfg.n_latent, cfg.block_size) == (1024, 24, 16384, 256, 1024)
    assert (cfg.n_head, tuple(cfg.latent_shape), cfg.numerics) == (16, (4, 16, 16), "official")
    assert cfg.plan == plan
    squeezed = {"mask_emb": (1024,), "latents": (256, 1024), "pos_emb": (1024, 1024)}
    for key, shape in layout.items():
        name = {"sos_emb": "latents"}.get(key, key).removeprefix("transformer.")
        assert tuple(ours[name].shape) == squeezed.get(name, shape), key
    assert len(ours) == len(layout)
    with torch.device("meta"):
        model = MeBT(cfg)
    model.load_state_dict(ours, strict=True)
    assert sum(p.numel() for p in model.parameters() if p.dim() > 0) > 300_000_000


# --- numerics ---

@pytest.mark.parametrize("plan", [None, ["latent_enc", "latent_dec", "lt2l", "latent_self", "lt2l", "latent_dec"]])
def test_converted_model_matches_official_forward(plan):
    w = small_official()
    codes, ctx_idx, tgt_idx = inputs()
    model = converted_model(w, layer_plan=plan)
    assert model.cfg.plan == (plan or PAPER_PLAN_6)
    with torch.no_grad():
        got = model(codes, ctx_idx, tgt_idx)
    want = reference_logits(w, plan or PAPER_PLAN_6, codes, ctx_idx, tgt_idx)
    assert got.shape == (2, 20, 24)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_preln_numerics_compute_a_different_function():
    # Shows the reference test is sensitive to the official residual quirk.
    w = small_official()
    codes, ctx_idx, tgt_idx = inputs()
    with torch.no_grad():
        got = converted_model(w, numerics="preln")(codes, ctx_idx, tgt_idx)
    assert (got - reference_logits(w, PAPER_PLAN_6, codes, ctx_idx, tgt_idx)).abs().max() > 1e-2


# --- errors ---

def test_missing_key_is_named():
    sd = small_official()
    del sd["transformer.blocks.3.attn.key.bias"]
    with pytest.raises(CheckpointError, match=r"official checkpoint is missing key 'transformer\.blocks\.3\.attn\.key\.bias'"):
        convert_official_state_dict(sd, n_head=N_HEAD, latent_shape=LATENT_SHAPE)


@pytest.mark.parametrize("key", ["transformer.blocks.0.attn.mask", "cond_stage_model.weight", "model_ema.decay"])
def test_unexpected_key_is_named(key):
    sd = small_official()
    sd[key] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=f"unexpected key '{key}'"):
        convert_official_state_dict(sd, n_head=N_HEAD, latent_shape=LATENT_SHAPE)


def test_wrong_shape_is_named():
    sd = small_official()
    sd["transformer.blocks.1.mlp.0.weight"] = torch.zeros(129, 32)
    with pytest.raises(CheckpointError, match=r"'transformer\.blocks\.1\.mlp\.0\.weight' of shape \[129, 32\] where \[128, 32\]"):
        convert_official_state_dict(sd, n_head=N_HEAD, latent_shape=LATENT_SHAPE)


def test_all_problems_in_one_line():
    sd = small_official()
    for key in [k for k in sd if k.startswith("transformer.blocks.2.")]:
        del sd[key]
    sd["transformer.blocks.0.attn.qkv.weight"] = sd.pop("transformer.blocks.0.attn.query.weight")
    sd["sos_emb"] = torch.zeros(1, 8, 31)
    with pytest.raises(CheckpointError) as err:
        convert_official_state_dict(sd, n_head=N_HEAD, latent_shape=LATENT_SHAPE)
    msg = str(err.value)
    assert "\n" not in msg
    for name in ("transformer.blocks.2.ln1.weight", "transformer.blocks.0.attn.query.weight",
                 "transformer.blocks.0.attn.qkv.weight", "'sos_emb' of shape [1, 8, 31]"):
        assert name in msg


def test_n_head_must_divide_n_embd():
    with pytest.raises(ConfigError, match=r"'n_head' \(5\) must divide n_embd \(32\)"):
        convert_official_state_dict(small_official(), n_head=5, latent_shape=LATENT_SHAPE)


def test_latent_shape_needed_and_checked():
    with pytest.raises(CheckpointError, match="block_size 32, not a multiple of 16x16 codes: pass latent_shape"):
        convert_official_state_dict(small_official(), n_head=N_HEAD)
    with pytest.raises(CheckpointError, match=r"latent_shape \[2, 4, 5\] has 40 positions .* block_size 32"):
        convert_official_state_dict(small_official(), n_head=N_HEAD, latent_shape=(2, 4, 5))


def test_checkpoint_without_blocks_or_embeddings():
    sd = {k: v for k, v in small_official().items() if not k.startswith("transformer.blocks.")}
    with pytest.raises(CheckpointError, match="no 'transformer.blocks.*' keys"):
        convert_official_state_dict(sd, n_head=N_HEAD, latent_shape=LATENT_SHAPE)
    with pytest.raises(CheckpointError, match="missing key 'tok_emb.weight'"):
        convert_official_state_dict(dict(VQGAN_KEYS), n_head=N_HEAD, latent_shape=LATENT_SHAPE)


def test_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="official MeBT checkpoint '.*nope.ckpt' does not exist; download it"):
        convert_official_file(tmp_path / "nope.ckpt", tmp_path / "out.pt")
    with pytest.raises(CheckpointError, match="model file '.*nope.pt' does not exist"):
        load_model(tmp_path / "nope.pt")
    assert os.listdir(tmp_path) == []


def test_files_of_the_wrong_kind(tmp_path):
    lightning = tmp_path / "official.ckpt"
    torch.save({"state_dict": small_official(), "epoch": 1}, lightning)
    with pytest.raises(CheckpointError, match="is not a mebt model file .*convert-official"):
        load_model(lightning)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="is not a mebt model file: torch.load failed"):
        load_model(garbage)
    with pytest.raises(CheckpointError, match="could not be read by torch.load"):
        convert_official_file(garbage, tmp_path / "out.pt")
    no_weights = tmp_path / "no_weights.ckpt"
    torch.save({"epoch": 1, "hyper_parameters": {}}, no_weights)
    with pytest.raises(CheckpointError, match="neither a Lightning 'state_dict' .*top-level keys: epoch, hyper_parameters"):
        convert_official_file(no_weights, tmp_path / "out.pt")


def edited_model_file(tmp_path, edit):
    """A small model file whose payload was changed by ``edit(payload)`` after saving."""
    path = tmp_path / "model.pt"
    save_model(converted_model(small_official()), path)
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)
    return path


def test_model_file_key_mismatch_is_named(tmp_path):
    def edit(payload):
        sd = payload["state_dict"]
        del sd["blocks.4.attn.value.bias"]
        sd["blocks.4.attn.gate.bias"] = torch.zeros(32)
        sd["head.weight"] = torch.zeros(25, 32)

    path = edited_model_file(tmp_path, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"model file '{path}'")
    for name in ("missing key 'blocks.4.attn.value.bias'", "unexpected key 'blocks.4.attn.gate.bias'",
                 "'head.weight' of shape [25, 32] where [24, 32]"):
        assert name in msg


def test_model_file_with_invalid_config(tmp_path):
    path = edited_model_file(tmp_path, lambda payload: payload["config"].update(n_head=5))
    with pytest.raises(CheckpointError, match=r"model file '.*' has an invalid config: config key 'n_head' \(5\)"):
        load_model(path)


# --- files ---

@pytest.mark.parametrize("form", ["lightning", "namespace", "bare"])
def test_convert_file_then_load_model_round_trip(tmp_path, form):
    w = small_official(seed=3)
    vqgan = {k: torch.randn(s) for k, s in VQGAN_KEYS.items()}
    ckpt = {"bare": {**w, **vqgan},
            "lightning": {"state_dict": {**w, **vqgan}, "epoch": 4, "hyper_parameters": {"lr": 3e-5}},
            "namespace": {"state_dict": {**w, **vqgan}, "hyper_parameters": {"args": argparse.Namespace(n_head=4)}},
            }[form]
    src = tmp_path / "official.ckpt"
    torch.save(ckpt, src)
    if form == "namespace":  # the case the weights_only=False fallback exists for
        with pytest.raises(pickle.UnpicklingError):
            torch.load(src, weights_only=True)

    cfg = convert_official_file(src, tmp_path / "out" / "model.pt", n_head=N_HEAD, latent_shape=LATENT_SHAPE)
    loaded = load_model(tmp_path / "out" / "model.pt")

    assert cfg == loaded.cfg and not loaded.training
    assert os.listdir(tmp_path / "out") == ["model.pt"]
    codes, ctx_idx, tgt_idx = inputs(seed=5)
    with torch.no_grad():
        got = loaded(codes, ctx_idx, tgt_idx)
        assert torch.equal(got, converted_model(w)(codes, ctx_idx, tgt_idx))
    torch.testing.assert_close(got, reference_logits(w, PAPER_PLAN_6, codes, ctx_idx, tgt_idx), atol=1e-5, rtol=1e-4)


def test_save_model_is_atomic_and_keeps_extra(tmp_path):
    path = tmp_path / "model.pt"
    model = converted_model(small_official())
    save_model(model, path, extra={"step": 7, "source": "test"})
    payload = read_model_file(path)
    assert (payload["format"], payload["model_type"], payload["step"], payload["source"]) == ("mebt-model-v1", "mebt", 7, "test")
    assert payload["config"]["layer_plan"] == PAPER_PLAN_6

    # A write that fails half-way leaves the previous file intact and no temporary file behind.
    with pytest.raises(Exception):
        save_model(converted_model(small_official(seed=9)), path, extra={"unpicklable": lambda: 0})
    assert os.listdir(tmp_path) == ["model.pt"]
    assert torch.equal(load_model(path).head.weight, model.head.weight)
    with pytest.raises(CheckpointError, match="reserved key 'config'"):
        save_model(model, path, extra={"config": {}})

