"""Config safety on resume: which changes are free, refused or allowed, and how they are recorded."""
import json

import pytest

from mebt.errors import ConfigError
from mebt.train.resume_config import CHANGES_FILE, check_resume, config_changes, record_changes

SAVED = {"model": {"n_layer": 6, "n_embd": 64}, "optim": {"lr": 0.002, "betas": [0.9, 0.95]},
         "train": {"steps": 100, "log_every": 10, "seed": 0}, "mlflow": {"experiment": "a"},
         "data": {"data_dir": "codes", "batch_size": 8}, "allow_config_change": []}


def changed(**edits) -> dict:
    new = json.loads(json.dumps(SAVED))
    for dotted, value in edits.items():
        section, key = dotted.split("__")
        new[section][key] = value
    return new


def test_changes_are_found_key_by_key_with_both_values():
    assert config_changes(SAVED, SAVED) == []
    assert config_changes(SAVED, changed(model__n_layer=4, optim__betas=(0.9, 0.95))) == [
        {"key": "model.n_layer", "saved": 6, "now": 4}]   # a tuple equals the saved list


def test_free_keys_pass_and_experiment_keys_are_refused_in_one_line(tmp_path):
    free = check_resume(SAVED, changed(train__steps=200, train__log_every=5, mlflow__experiment="b",
                                       data__data_dir="http://h/train-{0..3}.tar"), [], tmp_path, 50)
    assert [(c["key"], c["how"]) for c in free] == [("data.data_dir", "free"), ("mlflow.experiment", "free"),
                                                    ("train.log_every", "free"), ("train.steps", "free")]
    with pytest.raises(ConfigError) as info:
        check_resume(SAVED, changed(model__n_layer=4, optim__lr=0.001, train__steps=200, train__seed=1,
                                    data__batch_size=4), [], tmp_path, 50)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"resuming '{tmp_path}' at step 50 with a changed config: ")
    assert ("data.batch_size (saved 8, now 4), model.n_layer (saved 6, now 4), optim.lr (saved 0.002, now 0.001), "
            "train.seed (saved 0, now 1); these change the experiment") in message
    assert "--allow-config-change KEY" in message and "train.steps" not in message


def test_allowed_keys_pass_marked_and_unknown_names_are_refused(tmp_path):
    ok = check_resume(SAVED, changed(optim__lr=0.001, train__steps=200), ["optim.lr"], tmp_path, 50)
    assert [(c["key"], c["how"]) for c in ok] == [("optim.lr", "allowed"), ("train.steps", "free")]
    with pytest.raises(ConfigError, match="--allow-config-change names unknown config keys: optim.lrr"):
        check_resume(SAVED, changed(optim__lr=0.001), ["optim.lrr"], tmp_path, 50)


def test_changes_are_appended_and_summarised(tmp_path):
    assert record_changes(tmp_path, 10, []) == "" and not (tmp_path / CHANGES_FILE).exists()
    first = check_resume(SAVED, changed(train__steps=200), [], tmp_path, 10)
    record_changes(tmp_path, 10, first)
    second = check_resume(SAVED, changed(optim__lr=0.001), ["optim.lr"], tmp_path, 20)
    summary = record_changes(tmp_path, 20, second)
    assert summary.splitlines() == ["step 10: train.steps 100 -> 200 (free)",
                                    "step 20: optim.lr 0.002 -> 0.001 (allowed)"]
    records = [json.loads(line) for line in (tmp_path / CHANGES_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20] and records[1]["changes"][0]["how"] == "allowed"


def test_the_zero_stage_cannot_change_even_when_allowed(tmp_path):
    saved = {"deepspeed": {"zero_stage": 2}, "train": {"steps": 10}}
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage cannot change \(saved 2, now 3\): DeepSpeed 0.19 "
                                          r"loads a checkpoint only into an engine of its own ZeRO stage; resume with "
                                          r"deepspeed.zero_stage=2 or start a new train.run_dir"):
        check_resume(saved, {"deepspeed": {"zero_stage": 3}, "train": {"steps": 10}}, ["deepspeed.zero_stage"],
                     tmp_path, 6)
