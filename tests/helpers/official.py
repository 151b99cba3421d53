"""Fabricated official MeBT checkpoints in exactly the reference layout (tests/data)."""

import torch

from tests.helpers import DATA

# The official layout (copied from shared/reference/ so the suite runs from any clone).
REFERENCE = DATA / "mebt_official_16f_state_dict.tsv"
N_HEAD = 4
LATENT_SHAPE = (2, 4, 4)


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
