"""One configuration style for every command: flags generated from the config dataclass, --config YAML (with
bases and packaged names) and dotted KEY=VALUE overrides, in that order; --help shows defaults and docs."""
import argparse
import io
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from mebt.cli import COMMANDS, build_parser, main
from mebt.config import find_config, load_config, packaged_configs, read_config_file
from mebt.errors import ConfigError
from mebt.flags import Command, add_command, build_config, field_docs, parse_args


@dataclass
class Inner:
    depth: int = 3                   # how deep
    # a comment block above the field
    width: float = 0.5


@dataclass
class Section:
    lr: float = 0.1                  # learning rate


@dataclass
class Example:
    name: str = "x"                  # a name
    count: Optional[int] = None      # how many
    fast: bool = False               # go fast
    kind: Literal["a", "b"] = "a"    # which kind
    sizes: list[int] = field(default_factory=lambda: [1, 2])   # several sizes
    out_dir: str = field(default="o", metadata={"flag": "out"})   # where
    inner: Inner = field(default_factory=Inner, metadata={"flags": True})
    optim: Section = field(default_factory=Section)
    source: str = ""                 # positional


def parse(argv, positional=("source",)):
    parser = argparse.ArgumentParser()
    add_command(parser, Command(("ex",), Example, lambda cfg: cfg, "example", positional=positional))
    return build_config(parse_args(parser, argv))


def test_field_docs_come_from_the_comments():
    assert field_docs(Example)["count"] == "how many" and field_docs(Inner) == {"depth": "how deep",
                                                                                "width": "a comment block above the field"}


def test_flags_overrides_yaml_and_positionals_in_order(tmp_path):
    assert parse([]) == Example()
    cfg = parse(["src", "--count", "3", "--fast", "--kind", "b", "--sizes", "4", "5", "--out", "d", "--depth", "7",
                 "optim.lr=0.01", "width=2"])
    assert (cfg.source, cfg.count, cfg.fast, cfg.kind, cfg.sizes, cfg.out_dir) == ("src", 3, True, "b", [4, 5], "d")
    assert (cfg.inner.depth, cfg.inner.width, cfg.optim.lr) == (7, 2.0, 0.01)   # flat keys route into the section
    yaml = tmp_path / "c.yaml"
    yaml.write_text("name: from-yaml\ncount: 1\ndepth: 4\noptim: {lr: 0.5}\n")
    cfg = parse(["--config", str(yaml), "count=2", "--count", "5"])
    assert (cfg.name, cfg.count, cfg.inner.depth, cfg.optim.lr) == ("from-yaml", 5, 4, 0.5)   # flags come last
    assert parse(["--config", str(yaml), "count=2"]).count == 2                              # overrides over YAML
    assert parse(["--no-fast"]).fast is False and parse(["--sizes", "1", "--sizes", "2", "3"]).sizes == [1, 2, 3]
    # overrides after a list flag are overrides, not more of its values (--allow-config-change KEY k=v ...)
    cfg = parse(["src", "--sizes", "4", "width=2", "optim.lr=0.01"])
    assert (cfg.sizes, cfg.inner.width, cfg.optim.lr, cfg.source) == ([4], 2.0, 0.01, "src")
    # a text field takes its flag as written (YAML would read 1:30:00 as 5400 and 007 as 7)
    assert parse(["--name", "1:30:00"]).name == "1:30:00" and parse(["--name", "007"]).name == "007"


def test_bad_input_is_one_line_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr' \\(did you mean 'optim.lr'\\?\\)"):
        parse(["optim.lrr=1"])
    with pytest.raises(ConfigError, match="unknown config key 'dept' \\(did you mean 'depth'\\?\\)"):
        parse(["dept=1"])   # a flat section's key is named as the user wrote it
    with pytest.raises(ConfigError, match="config key 'count' must be int"):
        parse(["--count", "many"])
    with pytest.raises(ConfigError, match="unexpected argument 'extra'"):
        parse(["src", "extra"])


def test_help_lists_every_field_with_its_default_and_doc():
    parser = argparse.ArgumentParser()
    add_command(parser, Command(("ex",), Example, lambda cfg: cfg, "example", positional=("source",)))
    text = parser.format_help()
    for expected in ("--count COUNT", "how many", "--fast, --no-fast", "{a,b}", "(default: [1, 2])", "--out OUT_DIR",
                     "--depth DEPTH", "how deep (default: 3)", "optim.lr=0.1  # learning rate"):
        assert expected in text, expected


def test_every_command_builds_its_parser_and_help(capsys):
    for command in COMMANDS:
        argv = [*command.path, "--help"]
        with pytest.raises(SystemExit) as done, redirect_stdout(io.StringIO()) as out:
            build_parser(argv).parse_args(argv)
        assert done.value.code == 0 and "--config FILE" in out.getvalue(), command.path


def test_configs_compose_from_bases_and_packaged_names(tmp_path):
    assert find_config("ucf_16f") == packaged_configs() / "ucf_16f.yaml"
    data = read_config_file("ucf_128f")
    assert data["model"]["latent_shape"] == [32, 16, 16] and data["model"]["n_layer"] == 24   # paper_128f <- paper
    assert data["objective"]["t_prior"] == "gaussian100000_2" and data["sampling"] == {"preset": "ucf_128f"}
    (tmp_path / "a.yaml").write_text("base: b.yaml\nx: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        read_config_file(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="does not exist and is not a packaged config"):
        read_config_file(tmp_path / "missing.yaml")


def test_a_named_sampling_preset_sits_under_the_overrides():
    from mebt.core.sampling import preset
    from mebt.train.config import RunConfig

    cfg = load_config(RunConfig, "taichi_16f", ["sampling.steps=8"])
    expected = preset("taichi_16f")
    assert cfg.sampling.steps == 8 and cfg.sampling.ctemp == expected.ctemp and cfg.sampling.revise_rounds == 8
    with pytest.raises(ConfigError, match="unknown sampling preset 'nope'"):
        load_config(RunConfig, "taichi_16f", ["sampling.preset=nope"])


def test_the_cli_reports_config_errors_in_one_line(capsys):
    assert main(["fvd", "a", "b", "c"]) == 2
    assert capsys.readouterr().err.strip() == "mebt: error: unexpected argument 'c' (overrides are KEY=VALUE)"
