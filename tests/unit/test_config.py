from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from mebt.config import (
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    refuse_changed_settings,
    settings_differences,
    to_dict,
)
from mebt.core.model import MeBTConfig
from mebt.errors import ConfigError, UserError


@dataclass
class Inner:
    width: int = 8
    mode: Literal["a", "b"] = "a"
    scale: float = 1.0
    shape: tuple[int, int] = (1, 2)
    cap: Optional[int] = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    model: MeBTConfig = field(default_factory=MeBTConfig)
    name: str = "x"


def test_yaml_and_overrides_merge(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  width: 16\n  shape: [3, 4]\nname: run\n")
    cfg = load_config(Outer, path, ["inner.mode=b", "inner.scale=2", "model.n_layer=4", "inner.cap=7"])
    assert cfg.inner == Inner(width=16, mode="b", scale=2.0, shape=(3, 4), cap=7)
    assert load_config(Outer, None, ["inner.scale=1e-3"]).inner.scale == 0.001  # YAML reads 1e-3 as a string
    assert cfg.model.n_layer == 4 and cfg.name == "run"
    assert isinstance(cfg.inner.scale, float)
    # the resolved dict round-trips to the same config
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert flatten(to_dict(cfg))["inner.width"] == 16


@pytest.mark.parametrize("override, fragment", [
    (["inner.widht=3"], "unknown config key 'inner.widht' (did you mean 'inner.width'?)"),
    (["nope.x=1"], "unknown config key 'nope'"),
    (["inner.width=abc"], "config key 'inner.width' must be int"),
    (["inner.width=true"], "config key 'inner.width' must be int"),
    (["inner.mode=c"], "config key 'inner.mode' must be one of 'a', 'b'"),
    (["inner.shape=[1,2,3]"], "config key 'inner.shape' must have 2 items"),
    (["model.n_head=5"], "config key 'model.n_head' (5) must divide n_embd (1024)"),
    (["model.block_size=100"], "config key 'model.block_size' (100) does not match latent_shape"),
    (["model.layer_plan=[latent_enc, latent_dec]"], "config key 'model.n_layer' (24) does not match layer_plan's 2 blocks: set n_layer=2"),
    (["model.layer_plan=[latent_enc, wrong]", "model.n_layer=2"], "unknown block kind 'wrong'"),
    (["model.layer_plan=[latent_dec, latent_enc]", "model.n_layer=2"], "must end with latent_dec"),
    (["model.n_layer=3"], "config key 'model.n_layer' must be an even number"),
    (["inner"], "is not of the form key=value"),
    (["inner.scale=abc"], "config key 'inner.scale' must be float"),
])
def test_bad_values_give_one_clear_line(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(Outer, None, override)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("inner: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(Outer, bad)


def test_override_parsing_keeps_strings_and_nested_creation():
    data = apply_overrides({"a": {"b": 1}}, ["a.c=hello", "d.e.f=[1, 2]"])
    assert data == {"a": {"b": 1, "c": "hello"}, "d": {"e": {"f": [1, 2]}}}


def test_saved_settings_differences_are_one_line():
    digest = "ab" * 32
    saved = {"grid": [2, 4, 4], "clip": {"resolution": 16, "stride": 1}, "sha": digest, "count": 7, "note": "x"}
    # As read back from JSON: lists equal tuples; keys only the saved side has (counts, notes) do not count.
    assert settings_differences(saved, {"grid": (2, 4, 4), "clip": {"resolution": 16}, "sha": digest}) == []
    now = {"grid": (2, 8, 8), "clip": {"resolution": 32, "stride": 1}, "sha": "cd" * 32, "path": "a\nb",
           "long": "y" * 300}
    assert settings_differences(saved, now)[:4] == [
        "grid (saved [2, 4, 4], now [2, 8, 8])", "clip.resolution (saved 16, now 32)",
        "sha (saved abababababab..., now cdcdcdcdcdcd...)", 'path (saved null, now "a\\nb")']
    with pytest.raises(UserError) as caught:
        refuse_changed_settings("'out' holds videos of another config", saved, now, "use a new output folder",
                                UserError)
    message = str(caught.value)
    assert type(caught.value) is UserError and "\n" not in message and len(message) < 600
    assert message.startswith("'out' holds videos of another config: grid (saved [2, 4, 4], now [2, 8, 8]), clip.res")
    assert message.endswith(f'long (saved null, now "{"y" * 116}...); use a new output folder')
    with pytest.raises(ConfigError, match=r"^x changed: a \(saved 1, now 2\); fix it$"):
        refuse_changed_settings("x changed", {"a": 1}, {"a": 2}, "fix it")
    refuse_changed_settings("x changed", {"a": [1], "b": 2}, {"a": (1,)}, "fix it")   # nothing differs: no error
