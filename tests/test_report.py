"""Tracking sinks and the run report (stalwart/run/tracking.py, stalwart/run/report.py): a
run's report from its real files, faults and rollbacks marked from its real events,
TensorBoard and wandb fed from metrics.jsonl by exactly one process, a missing package
refused in one line before training, and sinks or reports that fail without failing the
run. Two real runs are shared by the tests: one process (`tracked`) and a supervisor of
two groups (`replicated`)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import job, jsonl
from stalwart.cli import main
from stalwart.run.report import MARKDOWN, PNG, RunRecords, markers, read_run, write_report_after_training
from stalwart.run.rundir import RunDir
from stalwart.run.tracking import Tracker

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QUIET_WANDB = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
# The smoke recipe, 40 steps; two injected spikes: step 22 is skipped, step 24 rolls back to
# checkpoint 20 (guards as in tests/test_train.py), so steps 21-23 are trained twice.
SPIKES = ["--train.steps", "40", "--eval.every", "20", "--guards.spike_min_history", "10",
          "--guards.spike_sigma", "100", "--guards.rollback_spikes", "2", "--guards.rollback_window", "10"]


def train(out: Path, *extra: str, env: dict | None = None, python: list[str] | None = None):
    return subprocess.run([sys.executable, *(python or ["-m", "stalwart"]), "train", "--out", str(out), "--recipe",
                           "smoke", "--quiet", *extra], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **QUIET_WANDB, **(env or {})})


@pytest.fixture(scope="module")
def tracked(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tracked") / "run"
    r = train(out, *SPIKES, "--track", "tensorboard,wandb", env={"STALWART_INJECT": "spike@22,spike@24"})
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def replicated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("replicated") / "run"
    r = job(out, "--replicas", "2", "--train.steps", "24", "--track", "tensorboard", "--train.report", "true",
            inject="kill@8:1")
    assert r.returncode == 0, r.stderr
    return out


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard reads back from RUN_DIR/tensorboard: (step, value) per tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def first_commits(run: Path) -> dict[int, float]:
    """Each step's loss as it was first committed (what the sinks log)."""
    losses: dict[int, float] = {}
    for r in jsonl(run / "metrics.jsonl"):
        if "loss" in r:
            losses.setdefault(r["step"], r["loss"])
    return losses


def test_a_training_run_ends_with_a_png_report_and_a_summary_of_its_steps(tracked):
    png = (tracked / PNG).read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    md = (tracked / MARKDOWN).read_text()
    assert "| steps | 40 of 40 |" in md and f"]({PNG})" in md
    assert "eval exact match" in md and "goodput" in md
    assert not [e for e in jsonl(tracked / "events.jsonl") if e["event"] in ("report_failed", "track_failed")]


def test_report_marks_the_runs_own_skipped_step_and_rollback(tracked):
    found = markers(read_run(tracked))
    assert [(m.kind, m.event["event"]) for m in found] == [("fault", "step_skipped"), ("fault", "step_skipped"),
                                                           ("rollback", "rollback")]
    # The skips at their own steps, the rollback (no step of its own) at the last commit before it.
    assert [m.step for m in found] == [22, 24, 23]
    md = (tracked / MARKDOWN).read_text()
    assert "2 faults, 0 heals, 1 rollbacks" in md and "- step 23: rollback (from_step 23, to_step 20)" in md


def test_tensorboard_holds_each_steps_first_committed_loss_and_the_evaluations(tracked):
    losses, logged = first_commits(tracked), scalars(tracked)
    assert [s for s, _ in logged["loss"]] == list(range(1, 41))  # the redone steps 21-23 once each
    assert all(value == pytest.approx(losses[step], rel=1e-6) for step, value in logged["loss"])
    evals = [e for e in jsonl(tracked / "events.jsonl") if e["event"] == "eval"]
    assert [s for s, _ in logged["eval_loss"]] == [e["step"] for e in evals] == [20, 40]
    assert {"lr", "grad_norm", "tokens_per_s", "participants", "eval_exact_match"} <= set(logged)


def test_wandb_writes_an_offline_run_under_the_run_directory_with_the_losses(tracked):
    (run_file,) = (tracked / "wandb").glob("offline-run-*/run-*.wandb")
    data = run_file.read_bytes()
    # The history records hold each value as JSON text: every logged loss is in the file.
    assert all(json.dumps(loss).encode() in data for loss in first_commits(tracked).values())
    assert b"eval_exact_match" in data


def test_a_resume_may_change_the_sinks_and_tensorboard_keeps_each_step_once(tracked, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tracked, run)
    shutil.rmtree(run / "checkpoints" / "step-000040")  # resumed from 35: steps 36-40 logged again
    r = train(run, "--resume", "--train.steps", "45", "--track", "tensorboard")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "config.json").read_text())["track"] == ["tensorboard"]
    logged = scalars(run)["loss"]
    assert [s for s, _ in logged] == list(range(1, 46))
    losses = first_commits(run)  # the resumed launch's records of 36-45 replaced the first's
    assert all(value == pytest.approx(losses[step], rel=1e-6) for step, value in logged)
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # no wandb this time
    assert "| steps | 45 of 45 |" in (run / MARKDOWN).read_text()


@pytest.mark.slow  # a supervisor, its Lighthouse and two groups
def test_a_supervised_job_is_tracked_and_reported_once_by_its_supervisor(replicated):
    assert len(list((replicated / "tensorboard").iterdir())) == 1  # one writer, not one per group
    logged = scalars(replicated)
    assert [s for s, _ in logged["loss"]] == list(range(1, 25))  # two groups' records, each step once
    assert max(v for _, v in logged["participants"]) == 2
    md = (replicated / MARKDOWN).read_text()
    assert "| steps | 24 of 24 |" in md and "1 restarts" in md
    kinds = [m.event["event"] for m in markers(read_run(replicated))]
    assert "group_exit" in kinds  # the killed group
    heals = [e for e in jsonl(replicated / "events.jsonl") if e["event"] == "heal" and e["step"] > 0]
    assert kinds.count("heal") == len(heals)  # its heal, if it came back before the end; never the start's


def test_heals_are_marked_except_the_first_sync_and_supervisor_events_at_the_last_commit():
    steps = [{"step": s, "loss": 1.0, "time": float(s)} for s in range(1, 6)]
    events = [{"event": "heal", "step": 0, "time": 0.5, "replica": 1},
              {"event": "group_exit", "time": 2.5, "replica": 1, "returncode": -9},  # the supervisor's: no step
              {"event": "heal", "step": 3, "time": 3.5, "replica": 1}]
    found = markers(RunRecords(Path("run"), steps, [], [], events, {}, 5))
    assert [(m.kind, m.step) for m in found] == [("fault", 2), ("heal", 3)]


@pytest.mark.parametrize("sink,package", [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_missing_sink_package_is_one_line_and_exit_2_before_anything_is_written(tmp_path, sink, package):
    blocked = f"import sys; sys.modules[{package!r}] = None; from stalwart.cli import main; sys.exit(main())"
    r = train(tmp_path / "run", "--track", sink, python=["-c", blocked])
    assert r.returncode == 2
    assert r.stderr.strip() == f"stalwart train: error: --track {sink} needs the {package} package: pip install {package}"
    assert not (tmp_path / "run").exists()


def test_an_unknown_sink_is_refused_in_one_line(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "run"), "--recipe", "smoke", "--track", "mlflow"]) == 2
    assert "unknown tracking sink mlflow (known: tensorboard, wandb)" in capsys.readouterr().err


def test_report_of_a_folder_that_is_no_run_or_has_no_step_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"stalwart report: error: {tmp_path} is not a run directory " \
                                              "(it has no config.json)"
    (tmp_path / "config.json").write_text("{}")
    assert main(["report", str(tmp_path)]) == 2
    assert "no committed step" in capsys.readouterr().err


def test_report_skips_a_torn_last_line_and_redraws_a_copied_run(tracked, tmp_path, capsys):
    for name in ("config.json", "metrics.jsonl", "events.jsonl"):
        (tmp_path / name).write_bytes((tracked / name).read_bytes())
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 41, "loss": 1.')  # a writer killed mid-line
    assert main(["report", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / PNG).read_bytes().startswith(PNG_SIGNATURE)
    assert "| steps | 40 of 40 |" in (tmp_path / MARKDOWN).read_text()


def test_a_report_that_fails_leaves_one_event_and_does_not_raise(tmp_path, capsys):
    run = RunDir(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # a run with no step: nothing to draw
    write_report_after_training(run)
    (event,) = jsonl(tmp_path / "events.jsonl")
    assert event["event"] == "report_failed" and "no committed step" in event["error"]
    assert "warning: no report written" in capsys.readouterr().err


class FailingSink:
    def __init__(self) -> None:
        self.calls = 0

    def log(self, scalars, step) -> None:
        self.calls += 1
        raise ConnectionError("the tracking server went away")

    def close(self) -> None:
        pass


def test_a_sink_that_fails_while_logging_is_dropped_with_one_event(tmp_path, capsys):
    run = RunDir(tmp_path)
    tracker = Tracker(run, (), config={})
    sink = tracker.sinks["wandb"] = FailingSink()
    for step in (1, 2):
        run.append_metrics({"step": step, "loss": 1.0, "time": 0.0})
        tracker.poll()  # never raises
    tracker.close()
    assert sink.calls == 1 and not tracker.sinks
    (event,) = [e for e in jsonl(tmp_path / "events.jsonl") if e["event"] == "track_failed"]
    assert event["sink"] == "wandb" and event["stage"] == "log" and "went away" in event["error"]
    assert capsys.readouterr().err.count("warning: --track wandb failed") == 1

