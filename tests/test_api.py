"""The Python API (docs/api.md): its example runs as written, and bad input is a UserError."""

import json
import re
from pathlib import Path

import pytest

import stalwart
from jobs import in_process
from stalwart.errors import UserError

DOCS = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_documented_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    example = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S)[1]
    exec(compile(example, str(DOCS), "exec"), {})  # noqa: S102 - the project's own documentation
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[0] == "40" and printed[-1] == "60"
    run = tmp_path / "runs" / "api-example"
    assert json.loads((run / "summary.json").read_text())["steps"] == 60
    resumed = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in resumed if e["event"] == "resume"] == [40]
    # The API's generation is the command's.
    cli = json.loads(in_process("generate", str(run / "export"), "--prompt", "12+34=", "--max-new-tokens", "24",
                                "--json").stdout)
    model = stalwart.load(run / "export")
    assert stalwart.generate(model, "12+34=", max_new_tokens=24) == cli["completion"]


def test_bad_input_is_a_user_error_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="unknown config key train.stepz"):
        stalwart.train("smoke", out=tmp_path / "run", train={"stepz": 3})
    with pytest.raises(UserError, match="unknown recipe 'huge'"):
        stalwart.train("huge", out=tmp_path / "run")
    with pytest.raises(UserError, match="takes a dict of keys"):
        stalwart.train("smoke", out=tmp_path / "run", train=3)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="neither a model folder nor a preset"):
        stalwart.load(tmp_path / "nothing")
