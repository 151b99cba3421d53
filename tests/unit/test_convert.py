"""Official-checkpoint conversion and the portable model file.

Official checkpoints are fabricated: full size with exactly the reference layout (on the meta device,
no memory), and small with random values, checked against a forward pass written here from the
reference description of the official block. Lightning checkpoints are saved the way the official code
saves them, hyper-parameters as real omegaconf configs, which the converter reads without omegaconf.
"""
import argparse
import math
import os
import pickle
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mebt.cli import main
from mebt.core.convert_official import convert_official_file, convert_official_state_dict
from mebt.core.model import MeBT
from mebt.core.model_file import (
    CheckpointError,
    load_model,
    load_model_with_extras,
    load_user_file,
    read_model_file,
    save_model,
)
from mebt.errors import ConfigError
from mebt.safe_unpickle import PickledObject
from tests.helpers.official import LATENT_SHAPE, N_HEAD, official_layout, read_reference, small_official

PAPER_PLAN_6 = ["latent_enc", "latent_self", "latent_enc", "latent_dec", "lt2l", "latent_dec"]
OTHER_PLAN = ["latent_enc", "latent_dec", "lt2l", "latent_self", "lt2l", "latent_dec"]
REPO = Path(__file__).resolve().parents[2]
VQGAN_KEYS = {"first_stage_model.encoder.conv_first.weight": (32, 3, 3, 3, 3),
              "first_stage_model.codebook.embeddings": (16384, 256),
              "first_stage_model.codebook.N": (16384,)}


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
    if form == "namespace":  # torch's weights-only reader refuses it; load_user_file reads it all the same
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


# --- Lightning checkpoints: the hyper-parameters the official code records ---

def lightning_checkpoint(path, state_dict, mode=OTHER_PLAN, shape=LATENT_SHAPE, hyper=None, **transformer):
    """An official checkpoint as Net2NetTransformer saves it (pytorch-lightning 1.7.5, ``torch.save``):
    its init arguments under hyper_parameters, the YAML's model.params and model.mask as real omegaconf
    DictConfigs, beside Lightning's optimizer, scheduler, callback and loop states. Defaults: 4 heads, a
    2x4x4 grid and a plan that is not the paper's."""
    params = dict(unconditional=True, vocab_size=24, first_stage_vocab_size=24, block_size=32, n_layer=len(mode),
                  n_head=N_HEAD, n_embd=32, n_unmasked=0, embd_pdrop=0.1, resid_pdrop=0.1, attn_pdrop=0.0,
                  first_stage_key="video", cond_stage_key="label", vtokens=False, sos_emb=8, avg_loss=True,
                  t_prior="longest", mode=list(mode), class_cond_dim=None)
    params.update(transformer)
    mask = {"target": "mebt.mask_sampler.MaskGen", "params": {"iid": False, "schedule": "linear", "max_token": 32,
                                                               "method": "mlm", "shape": list(shape),
                                                               "t_range": [0.0, 1.0], "budget": 32}}
    vqvae = {"params": {"ckpt_path": "ckpts/tats/vqgan_ucf_128_488.ckpt", "ignore_keys": ["loss"]}}
    param = torch.nn.Parameter(torch.zeros(3))
    optim = torch.optim.AdamW([param], lr=3e-5)
    param.sum().backward()
    optim.step()
    hyper_parameters = {"transformer_config": OmegaConf.create(params), "first_stage_config": OmegaConf.create(vqvae),
                        "mask_config": OmegaConf.create(mask), "ckpt_path": None, "ignore_keys": [],
                        "first_stage_key": "video", "cond_stage_key": "label", "pkeep": 1.0, "sos_token": 0,
                        **(hyper or {})}
    torch.save({"epoch": 49, "global_step": 20000, "pytorch-lightning_version": "1.7.5", "state_dict": state_dict,
                "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 50}}}},
                "callbacks": {"ModelCheckpoint{'monitor': 'val/loss'}": {"best_model_score": torch.tensor(1.5)}},
                "optimizer_states": [optim.state_dict()], "lr_schedulers": [],
                "hparams_name": "kwargs", "hyper_parameters": hyper_parameters}, path)
    return path


def with_vqgan(sd):
    # Stride-0 views: the 16384-entry codebook costs nothing to save.
    return {**sd, **{k: torch.zeros(()).expand(s) for k, s in VQGAN_KEYS.items()}}


def test_lightning_checkpoint_converts_with_its_recorded_heads_grid_and_plan(tmp_path):
    w = small_official(seed=4)
    src = lightning_checkpoint(tmp_path / "official.ckpt", with_vqgan(w))

    cfg = convert_official_file(src, tmp_path / "model.pt")   # nothing given: all from the checkpoint
    model, extra = load_model_with_extras(tmp_path / "model.pt")

    assert (cfg.n_head, tuple(cfg.latent_shape), cfg.plan) == (N_HEAD, LATENT_SHAPE, OTHER_PLAN) and model.cfg == cfg
    codes, ctx_idx, tgt_idx = inputs(seed=6)
    with torch.no_grad():
        got = model(codes, ctx_idx, tgt_idx)
    torch.testing.assert_close(got, reference_logits(w, OTHER_PLAN, codes, ctx_idx, tgt_idx, n_head=N_HEAD),
                               atol=1e-5, rtol=1e-4)
    # What guessing (16 heads, the paper's plan) would have computed is far off.
    guess = reference_logits(w, PAPER_PLAN_6, codes, ctx_idx, tgt_idx, n_head=16)
    assert (guess - got).abs().max() > 0.1
    assert extra["settings_from"] == {"n_head": "checkpoint", "latent_shape": "checkpoint", "layer_plan": "checkpoint"}
    assert extra["official_hparams"] == {"n_head": 4, "n_layer": 6, "n_embd": 32, "vocab_size": 24, "block_size": 32,
                                         "n_latent": 8, "layer_plan": OTHER_PLAN, "latent_shape": [2, 4, 4],
                                         "embd_pdrop": 0.1, "resid_pdrop": 0.1, "attn_pdrop": 0.0}


def test_lightning_checkpoint_converts_where_omegaconf_cannot_be_imported(tmp_path):
    src = lightning_checkpoint(tmp_path / "official.ckpt", small_official())
    script = ("import sys\n"
              "sys.modules['omegaconf'] = None  # every import of omegaconf now fails\n"
              "import torch\n"
              "from mebt.core.convert_official import convert_official_file\n"
              "try:\n"
              "    torch.load(sys.argv[1], weights_only=False)\n"
              "except ImportError as e:\n"
              "    print('plain torch.load:', e)\n"
              "cfg = convert_official_file(sys.argv[1], sys.argv[2])\n"
              "print('converted:', cfg.n_head, cfg.layer_plan)\n")
    out = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "model.pt")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "plain torch.load: No module named 'omegaconf" in out.stdout   # the file does need omegaconf to unpickle
    assert f"converted: {N_HEAD} {OTHER_PLAN}" in out.stdout
    assert load_model(tmp_path / "model.pt").cfg.n_head == N_HEAD


@pytest.mark.parametrize("given, recorded, flag", [
    ({"n_head": 16}, "transformer_config.n_head = 4", "--n-head 16"),
    ({"latent_shape": (4, 2, 4)}, "mask_config.params.shape = [2, 4, 4]", "--latent-shape 4 2 4"),
    ({"layer_plan": PAPER_PLAN_6}, f"transformer_config.mode = {OTHER_PLAN}", "--layer-plan " + " ".join(PAPER_PLAN_6)),
])
def test_argument_contradicting_the_checkpoint_is_refused(tmp_path, given, recorded, flag):
    src = lightning_checkpoint(tmp_path / "official.ckpt", small_official())
    with pytest.raises(CheckpointError) as err:
        convert_official_file(src, tmp_path / "model.pt", **given)
    assert str(err.value) == (f"official MeBT checkpoint '{src}' records {recorded}, but {flag} was given: "
                              f"omit {flag.split()[0]} to use the checkpoint's value")
    assert not (tmp_path / "model.pt").exists()


def test_cli_takes_the_checkpoint_settings_and_refuses_contradicting_flags(tmp_path, capsys):
    src = str(lightning_checkpoint(tmp_path / "official.ckpt", small_official()))
    assert main(["convert-official", src, str(tmp_path / "a.pt")]) == 0
    assert f"{N_HEAD} heads, 8 latents, grid [2, 4, 4]" in capsys.readouterr().out
    agreeing = ["--n-head", "4", "--latent-shape", "2", "4", "4", "--layer-plan", *OTHER_PLAN]
    assert main(["convert-official", src, str(tmp_path / "b.pt"), *agreeing]) == 0
    assert load_model(tmp_path / "b.pt").cfg == load_model(tmp_path / "a.pt").cfg
    capsys.readouterr()
    assert main(["convert-official", src, str(tmp_path / "c.pt"), "--n-head", "16"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mebt: error:")]
    assert len(errors) == 1 and "records transformer_config.n_head = 4, but --n-head 16 was given" in errors[0]
    assert not (tmp_path / "c.pt").exists()


@pytest.mark.parametrize("change, words", [
    ({"n_embd": 64}, "transformer_config.n_embd = 64 but the state dict has n_embd 32"),
    ({"sos_emb": 16}, "transformer_config.sos_emb = 16 but the state dict has n_latent 8"),
    ({"vocab_size": 16384}, "transformer_config.vocab_size = 16384 but the state dict has vocab_size 24"),
    ({"mode": OTHER_PLAN[:4]}, "transformer_config.mode with 4 block kinds but the state dict has 6 blocks"),
    ({"shape": (2, 4, 5)}, "mask_config.params.shape = [2, 4, 5] (40 positions) but the state dict has block_size 32"),
    ({"mode": OTHER_PLAN[:5] + ["maskgit"]}, "transformer_config.mode with block kind 'maskgit', which mebt does not"),
    ({"n_head": "${n_layer}"}, "records transformer_config.n_head = '${n_layer}', expected a positive integer"),
    ({"hyper": {"transformer_config": Fraction(1, 3)}},
     "records hyper_parameters['transformer_config'] as <pickled fractions.Fraction object>, not a config"),
])
def test_recorded_settings_are_checked_against_the_weights(tmp_path, change, words):
    change = dict(change)
    src = lightning_checkpoint(tmp_path / "official.ckpt", small_official(), mode=change.pop("mode", OTHER_PLAN),
                               shape=change.pop("shape", LATENT_SHAPE), hyper=change.pop("hyper", None), **change)
    with pytest.raises(CheckpointError) as err:
        convert_official_file(src, tmp_path / "model.pt")
    assert words in str(err.value) and "\n" not in str(err.value)


class RunsCommand:
    """Pickles as os.system(command): what a hostile checkpoint would put in its hyper-parameters."""
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_code_in_a_checkpoint_is_read_as_data_never_run(tmp_path):
    marker = tmp_path / "ran"
    command = f"touch '{marker}'"
    src = lightning_checkpoint(tmp_path / "official.ckpt", small_official(), hyper={"payload": RunsCommand(command)})

    cfg = convert_official_file(src, tmp_path / "model.pt")
    payload = load_user_file(src, "test checkpoint")["hyper_parameters"]["payload"]

    assert not marker.exists() and cfg.n_head == N_HEAD
    assert isinstance(payload, PickledObject) and payload.pickled_global == f"{os.name}.system"
    assert payload.args == (command,)
    torch.load(src, weights_only=False)   # the control: the unrestricted unpickler runs it
    assert marker.exists()
