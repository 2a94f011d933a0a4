"""`--config FILE` (TOML) and `stalwart config show`: the same keys as the overrides."""

import dataclasses
import json

import pytest

from jobs import in_process
from stalwart.commands.train import SECTIONS
from stalwart.config import SECTION_TYPES, apply_overrides
from stalwart.config_file import read_config_file
from stalwart.model import ModelConfig
from stalwart.recipes import recipe

FILE = """\
# a run as a file
recipe = "smoke"
track = []

[train]
steps = 7
batch_size = 4

[data]
task = "files"
files = ["a.txt", "b.jsonl"]
seq_len = 32

[model]
rope_scaling = { factor = 4.0, original_max_position_embeddings = 128 }
"""


def test_a_file_sets_the_same_keys_as_overrides_and_overrides_apply_on_top(tmp_path):
    (tmp_path / "run.toml").write_text(FILE)
    given = read_config_file(tmp_path / "run.toml")
    assert given.recipe == "smoke" and given.track == ()
    cfg = apply_overrides(recipe(given.recipe), {**given.settings, "train.steps": "3"})
    assert cfg == apply_overrides(recipe("smoke"), {
        "train.steps": "3", "train.batch_size": "4", "data.task": "files", "data.files": "a.txt,b.jsonl",
        "data.seq_len": "32", "model.rope_scaling": '{"factor": 4.0, "original_max_position_embeddings": 128}'})


def test_none_resets_an_optional_key_and_track_reads_as_the_flag_does(tmp_path):
    (tmp_path / "run.toml").write_text('track = ["none"]\n[model]\nq_lora_rank = "none"\n')
    given = read_config_file(tmp_path / "run.toml")
    assert given.track == () and apply_overrides(recipe("default"), given.settings).model.q_lora_rank is None


def test_train_runs_from_a_file_with_overrides_on_top(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text('recipe = "smoke"\n[train]\nsteps = 50\n[eval]\nproblems = 0\n')
    r = in_process("train", "--config", "run.toml", "--out", "run", "--train.steps", "2", "--json")
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["recipe"] == "smoke" and saved["train"]["steps"] == 2 and saved["eval"]["problems"] == 0
    assert json.loads(r.stdout) == json.loads((tmp_path / "run" / "summary.json").read_text())  # --json


@pytest.mark.parametrize("text, words", [
    ('[train]\nsteps = "five"\n', "run.toml:2: train.steps must be an integer, got 'five'"),
    ('[train]\nlog_every = 5\n\n[train2]\nsteps = 5\n', "run.toml:4: unknown config section train2"),
    ('[data]\nseq_len = 64\nfiels = ["a.txt"]\n', "run.toml:3: unknown config key data.fiels (known in data:"),
    ('[model]\nfrom = 3\n', "run.toml:2: model.from must be a string, got 3"),
    ('track = "tensorboard"\n', "run.toml:1: track must be a list of strings"),
    ('[train]\nsteps = \n', "run.toml: not valid TOML: "),
    ('[train]\nsteps = 0\n', "run.toml:2: train.steps must be in 1..999999, got 0"),
    ('\n[data]\nformat = "chatt"\n', "run.toml:3: data.format must be one of text, chat"),
    ('recipe = "nope"\n', "run.toml:1: unknown recipe 'nope'"),
    ('track = ["tensorbord"]\n', "run.toml:1: track: unknown tracking sink tensorbord"),
])
def test_a_bad_key_or_type_in_a_file_names_the_file_the_key_and_the_line(text, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.toml").write_text(text)
    r = in_process("train", "--config", "run.toml", "--out", "run")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert words in r.stderr
    assert not (tmp_path / "run").exists()
    assert "cannot read config file" in in_process("train", "--config", "missing.toml").stderr


def test_config_show_lists_every_key_with_its_type_value_and_help(tmp_path):
    r = in_process("config", "show", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["key"]: row for row in json.loads(r.stdout)}
    for section, cls in {"model": ModelConfig, **SECTION_TYPES}.items():
        for f in dataclasses.fields(cls):
            row = rows.pop(f"{section}.{f.name}")
            assert row["type"] == f.type and row["help"], row
    assert set(rows) == {"model.from", "track"}
    (tmp_path / "run.toml").write_text('recipe = "smoke"\n[train]\nsteps = 7\n')
    shown = in_process("config", "show", "--config", str(tmp_path / "run.toml"))
    line = next(x for x in shown.stdout.splitlines() if x.startswith("train.steps "))
    assert line.split()[1:3] == ["int", "7"] and "optimizer steps" in line


def test_train_help_lists_every_section():
    assert set(SECTIONS) == {"model", *SECTION_TYPES}
    r = in_process("train", "--help")
    assert "--config" in r.stdout and all(s in " ".join(r.stdout.split()) for s in SECTIONS)
