"""The faults unstable fleets produce, against real replica groups (a real Lighthouse,
gloo, one process per group under the supervisor): persistent NaNs, silent corruption
with and without a majority, a full disk, a lost Lighthouse or supervisor, a hung torchrun
group, an outsider without the job secret; and the data each group trains, audited batch
by batch. Faults come by step (STALWART_INJECT) or from outside, by signal."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from jobs import (SECRET, alive, descendants, events, final_fingerprints, group_pid_once_all_train, job, jsonl,
                  positions_of_shard, start_job, stop_all, wait_for)

pytestmark = pytest.mark.slow


def test_persistent_nan_in_one_groups_weights_heals_and_a_nan_producing_device_is_restarted(tmp_path):
    run = tmp_path / "run"
    # Group 1: a NaN lands in its weights after step 17, between two fingerprint checks (every
    # 5 steps). Group 2: its device produces NaN gradients from step 40 on, in every step.
    # No spike guard: which steps run with two groups and which with three depends on when
    # the restarted one is back, and now and then that tips a grad norm over the rolling
    # bound (a legitimate skip, seen on CI); this test is about the NaNs.
    r = job(run, "--replicas", "3", "--train.steps", "250", "--guards.spike_sigma", "0",
            inject="nan-weight@17:1,nan-device@40:2", timeout=240)
    assert r.returncode == 0, r.stderr
    found = events(run)
    assert not [e for e in found if e["event"] in ("step_skipped", "stall", "stalled")]  # the others never stopped
    corrupt = [e for e in found if e["event"] == "step_corrupt"]
    first = next(e for e in corrupt if e["replica"] == 1)
    assert first["step"] == 18 and not first["healed_before"]
    assert any(e["event"] == "heal" and e["replica"] == 1 and e["time"] > first["time"] for e in found)
    assert any(e["event"] == "nonfinite_group" and e["replicas"] == [1] and e["step"] == 18 for e in found)
    # Group 2 is non-finite again right after its heal: restarted (its restart runs clean).
    two = [e for e in corrupt if e["replica"] == 2]
    assert two[0]["step"] == 40 and not two[0]["healed_before"] and two[1]["healed_before"]
    exit_ = next(e for e in found if e["event"] == "group_exit" and e["replica"] == 2)
    assert exit_["returncode"] == 4  # EXIT_NONFINITE
    assert any(e["event"] == "heal" and e["replica"] == 2 and e["time"] > exit_["time"] for e in found)
    metrics = jsonl(run / "metrics.jsonl")
    assert all(m["loss"] == m["loss"] for m in metrics)  # no committed step is non-finite
    assert json.loads((run / "summary.json").read_text())["steps"] == 250
    prints = final_fingerprints(run)
    assert sorted(prints) == [0, 1, 2] and len(set(prints.values())) == 1


def test_nan_in_every_group_escalates_and_stops_the_job_with_exit_1(tmp_path):
    run = tmp_path / "run"
    r = job(run, "--replicas", "2", "--train.steps", "60", "--guards.max_uncommitted_steps", "4",
            "--checkpoint.every", "5", inject="nan-device@8")
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "stopped the job" in r.stderr, r.stderr
    found = events(run)
    assert any(e["event"] == "stall" and e["rung"] == "fingerprints" for e in found)
    assert any(e["event"] == "rollback" and e["to_step"] == 5 for e in found)
    assert any(e["event"] == "stalled" for e in found) and any(e["event"] == "group_error" for e in found)
    assert not any(e["event"] == "group_restart" for e in found)
    assert len([e for e in found if e["event"] == "step_skipped" and e["replica"] == 0]) == 12  # bounded


def test_groups_that_fail_the_same_way_at_start_stop_the_job_with_that_line_not_a_restart_loop(tmp_path):
    # Every group process (never the supervisor) dies while starting, as on a broken install.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if '--replica-id' in sys.argv or '--standby' in sys.argv:\n"
        "    print(f'RuntimeError: device lost during initialisation (pid {os.getpid()})', file=sys.stderr, flush=True)\n"
        "    os._exit(1)\n")
    pythonpath = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    run = tmp_path / "run"
    p = start_job(run, "--replicas", "2", "--train.steps", "20", env={"PYTHONPATH": pythonpath})
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    (line,) = err.strip().splitlines()
    assert re.fullmatch(r"stalwart train: stopped: every replica group crashed 3 times before its first step with: "
                        rf"RuntimeError: device lost during initialisation \(pid \d+\) \(see {re.escape(str(run))}/logs/replica-0\.log\)",
                        line), line
    found = events(run)
    assert len([e for e in found if e["event"] == "group_exit"]) in (6, 7)  # 3 launches each, not max_restarts
    assert [e["event"] for e in found if e["event"] == "job_failing_at_start"] == ["job_failing_at_start"]


@pytest.mark.parametrize("ranks", [1, 2])
def test_two_groups_that_disagree_both_roll_back_to_the_last_agreeing_checkpoint(ranks, tmp_path):
    # With 2 ranks a group, FSDP2 inside: the bit flips in each of group 1's shards, and
    # both groups roll back together from their sharded checkpoint.
    run = tmp_path / "run"
    r = job(run, "--replicas", "2", "--replicas.ranks_per_group", str(ranks), "--train.steps", "30",
            "--checkpoint.every", "5", inject="flip-bit@12:1")
    assert r.returncode == 0, r.stderr
    found = events(run)
    sdc = next(e for e in found if e["event"] == "sdc_detected")
    assert sdc["replicas"] == [0, 1] and not sdc["resolved"] and sdc["step"] == 15
    rollback = next(e for e in found if e["event"] == "rollback")
    assert rollback["to_step"] == 10 and "no majority" in rollback["reason"] and rollback["data_replayed"]
    # The disagreeing state of step 15 was never checkpointed before the rollback.
    assert not [e for e in found if e["event"] == "checkpoint" and e["step"] > 10 and e["time"] < rollback["time"]]
    assert len(set(final_fingerprints(run).values())) == 1
    assert json.loads((run / "summary.json").read_text())["steps"] == 30


def test_the_lowest_group_corrupted_just_before_a_checkpoint_never_writes_it(tmp_path):
    run = tmp_path / "run"
    # Fingerprints only before checkpoints: the flip after step 14 is found at the check of step 15.
    r = job(run, "--replicas", "3", "--train.steps", "30", "--checkpoint.every", "5", "--guards.fingerprint_every", "0",
            inject="flip-bit@14:0")
    assert r.returncode == 0, r.stderr
    found = events(run)
    sdc = next(e for e in found if e["event"] == "sdc_detected")
    assert sdc["replicas"] == [0] and sdc["resolved"] and sdc["step"] == 15
    (saved,) = [e for e in found if e["event"] == "checkpoint" and e["step"] == 15]
    assert saved["replica"] == 1  # the lowest group of the majority
    assert any(e["event"] == "heal" and e["replica"] == 0 and e["time"] > sdc["time"] for e in found)
    assert len(set(final_fingerprints(run).values())) == 1


def test_disk_full_while_checkpointing_with_replicas_stops_the_job_with_one_line_and_exit_2(tmp_path):
    disk = tmp_path / "small"
    disk.mkdir()
    # One checkpoint of the smoke model is ~3.6 MB: the first fits, the second does not.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = tmp_path / "run"
        r = job(run, "--replicas", "2", "--train.steps", "40", "--checkpoint.every", "5", "--checkpoint.dir",
                str(disk / "checkpoints"))
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], r.stderr
        found = events(run)
        assert len([e for e in found if e["event"] == "group_error"]) == 1
        assert not [e for e in found if e["event"] in ("group_restart", "group_exit")]  # no restart loop
        assert not [p for p in (disk / "checkpoints").iterdir() if p.name.startswith(".")]  # nothing half-written
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_sigkilled_group_is_restarted_and_healed_and_every_batch_is_trained_exactly_once(tmp_path):
    run = tmp_path / "run"
    # This test is about the steps the survivors commit without group 1, so group 1 must come
    # back after their next quorum: that quorum waits up to replicas.timeout_s (5 s) for the
    # collective to fail, so the restart waits 6 s, and no warm spare (a ready one joins the
    # survivors' very next quorum; its own test is below). 300 steps: the survivors must
    # still be training when the restarted process is up, or there is nobody to heal from.
    # No spike guard: a step it skips drops its batch by design (a gap the audit would flag),
    # and whether one comes before step 300 depends on when group 1 rejoined.
    r = job(run, "--replicas", "3", "--train.steps", "300", "--checkpoint.mtbf_s", "5", "--train.trace_data", "true",
            "--replicas.warm_spare", "false", "--replicas.restart_backoff_s", "6", "--guards.spike_sigma", "0",
            inject="kill-in-exchange@20:1")  # killed while its peers wait in step 20's collective
    assert r.returncode == 0, r.stderr
    found = events(run)
    kinds = [e["event"] for e in found]
    exit_ = next(e for e in found if e["event"] == "group_exit")
    assert exit_["replica"] == 1 and exit_["signal"] == "SIGKILL"
    assert "group_restart" in kinds
    heal = [e for e in found if e["event"] == "heal" and e["replica"] == 1 and e["time"] > exit_["time"]]
    assert heal, "the restarted group did not heal from a peer"
    # The survivors never stopped: they committed steps while group 1 was down.
    metrics = jsonl(run / "metrics.jsonl")
    during = [m for m in metrics if exit_["time"] < m["time"] < heal[0]["time"] and m["replica"] != 1]
    assert during and all(m["participants"] == 2 for m in during[1:])
    # Group 0 never died: its records list, for every committed step, each shard whose batch it trained.
    records = [m for m in metrics if m["replica"] == 0]
    assert [m["step"] for m in records] == list(range(1, 301))
    # The survivors kept step 20's forward and backward and sent it again without group 1.
    assert records[19]["sends"] == 2 and records[19]["participants"] == 2 and "1" not in records[19]["data"]
    for shard in range(3):
        trained = [m["data"][str(shard)] for m in records if str(shard) in m["data"]]
        # In order, without a repeat or a gap: exactly the batches an untouched loader yields.
        assert trained == positions_of_shard(run, shard)[:len(trained)]
    missing = [m["step"] for m in records if "1" not in m["data"]]
    assert missing and missing[0] == 20  # group 1 was out while it restarted, then continued its own shard
    # After the heal the restarted group's weights and optimizer equal the survivors': no
    # fingerprint check found a difference, and all three end bit-identical.
    assert "sdc_detected" not in kinds
    prints = final_fingerprints(run)
    assert sorted(prints) == [0, 1, 2] and len(set(prints.values())) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 300 and summary["restarts"] == 1
    # Checkpoints by the lowest live group at the Young/Daly interval once one cost is known.
    saved = [e for e in found if e["event"] == "checkpoint"]
    assert {e["replica"] for e in saved} <= {0, 2} and saved[-1]["rule"] == "young-daly"
    crash = [f for f in summary["faults"] if f["kind"] == "crash"]
    assert crash and crash[0]["recover_s"] is not None and 0 < summary["ettr"] <= 1
    # The planner takes the recovery measured here as a replica group's restart, and adds
    # the heal of the planned state over the fleet's scale-out link (H800: 50 GB/s).
    r = subprocess.run([sys.executable, "-m", "stalwart", "plan", "--model", "deepseek-v3", "--tokens", "1T",
                        "--accelerator", "H800", "--devices", "2048", "--pp", "16", "--ep", "64",
                        "--strategy", "replicas", "--from-run", str(run), "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["measured"]["recover_s"] == summary["mean_recover_s"]
    assert plan["failures"]["recover_s"] == pytest.approx(summary["mean_recover_s"] + plan["failures"]["checkpoint_gb"] / 50)


def test_a_restart_becomes_the_warm_spare_unless_it_is_stopped_and_a_killed_spare_is_replaced(tmp_path):
    run = tmp_path / "run"
    proc = start_job(run, "--replicas", "2", "--train.steps", "3000")

    def ready_spare(n: int) -> int:
        spare = wait_for(lambda: events(run, "spare_start")[n:], 60, f"spare {n + 1}")[0]["pid"]
        wait_for(lambda: (run / "logs" / f"spare-{spare}.ready").exists(), 60, "the spare's imports")
        return spare

    def restart_of_group_1(n: int) -> dict:
        victim = [e["pid"] for e in events(run, "group_start") if e["replica"] == 1][-1]
        os.kill(victim, signal.SIGKILL)
        start = wait_for(lambda: [e for e in events(run, "group_start") if e["replica"] == 1][n:], 30,
                         "group 1's restart")[0]
        wait_for(lambda: [e for e in events(run, "heal") if e["replica"] == 1 and e["time"] > start["time"]], 60,
                 "the restarted group 1 to heal")
        return start

    try:
        first = ready_spare(0)
        os.kill(first, signal.SIGSTOP)  # a stopped spare is not handed out: the restart starts a new process
        assert not restart_of_group_1(1)["spare"]
        os.kill(first, signal.SIGKILL)  # a spare is a process of the job like any other
        second = ready_spare(1)
        start = restart_of_group_1(2)
        assert start["spare"] and start["pid"] == second
        # It is group 1 in every respect: its metrics are group 1's, its output goes to group 1's log.
        wait_for(lambda: [m for m in jsonl(run / "metrics.jsonl") if m["replica"] == 1 and m["time"] > start["time"]],
                 30, "a step committed by the new group 1")
        assert proc.poll() is None and [e["replica"] for e in events(run, "group_exit")] == [1, 1]
        assert any(e["event"] == "spare_exit" and e["pid"] == first for e in events(run))
    finally:
        stop_all(proc)
    assert "stalwart train" not in (run / "logs" / "spare.log").read_text()  # no spare wrote an error


def test_a_resumed_job_whose_groups_all_died_repeats_the_uninterrupted_losses_exactly(tmp_path):
    steps = ["--replicas", "2", "--train.steps", "30", "--checkpoint.every", "10"]
    reference = tmp_path / "reference"
    assert job(reference, *steps).returncode == 0
    run = tmp_path / "run"
    r = job(run, *steps, "--replicas.max_restarts", "0", inject="kill@15")
    assert r.returncode == 2 and "every replica group failed" in r.stderr
    r = subprocess.run([sys.executable, "-m", "stalwart", "train", "--out", str(run), "--resume", "--quiet"],
                       capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr

    def losses(path: Path) -> dict[int, float]:
        records = [m for m in jsonl(path / "metrics.jsonl") if m["replica"] == 0]
        assert all(m["participants"] == 2 for m in records)  # the same membership throughout
        return {m["step"]: m["loss"] for m in records}

    assert losses(run) == losses(reference) and len(losses(run)) == 30


def test_a_killed_lighthouse_is_restarted_and_a_killed_supervisor_leaves_no_orphan(tmp_path):
    run = tmp_path / "run"
    proc = start_job(run, "--replicas", "2", "--train.steps", "3000", "--replicas.quorum_timeout_s", "3")
    try:
        group_pid_once_all_train(run, groups=2, replica=0)
        lighthouse = events(run, "lighthouse_start")[0]["pid"]
        os.kill(lighthouse, signal.SIGKILL)
        killed = time.time()
        wait_for(lambda: len(events(run, "lighthouse_start")) == 2, 15, "the supervisor to restart its Lighthouse")
        wait_for(lambda: [m for m in jsonl(run / "metrics.jsonl") if m["time"] > killed + 1 and m["participants"] == 2],
                 60, "both groups to train again through the new Lighthouse")
        assert not events(run, "group_exit"), "a group lost its process to the Lighthouse outage"
        pids = [e["pid"] for e in events(run, "group_start")] + [events(run, "lighthouse_start")[-1]["pid"]]
        proc.send_signal(signal.SIGKILL)  # the supervisor itself
        proc.wait(timeout=10)
        wait_for(lambda: not [p for p in pids if alive(p)], 15, "the groups and the Lighthouse to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
    last = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    r = subprocess.run([sys.executable, "-m", "stalwart", "train", "--out", str(run), "--resume", "--quiet",
                        "--train.steps", str(last + 50)], capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == last + 50


def _lighthouse(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stalwart", "lighthouse", "--bind", f"127.0.0.1:{port}",
                             "--join-timeout-s", "1", "--heartbeat-timeout-s", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_lighthouse_killed_and_started_again_5s_later_costs_no_group_its_process(tmp_path):
    port = _free_port()
    lighthouse = _lighthouse(port)
    run = tmp_path / "run"
    proc = start_job(run, "--replicas", "2", "--train.steps", "500", "--replicas.quorum_timeout_s", "3",
                     "--lighthouse", f"127.0.0.1:{port}", "--groups", "0,1", env={"STALWART_JOB_SECRET": SECRET})
    try:
        group_pid_once_all_train(run, groups=2, replica=0)
        lighthouse.kill()
        lighthouse.wait()
        time.sleep(5)
        lighthouse = _lighthouse(port)
        _, err = proc.communicate(timeout=240)
    finally:
        stop_all(proc, lighthouse)
    assert proc.returncode == 0, err
    found = events(run)
    assert not [e for e in found if e["event"] in ("group_exit", "group_restart")]
    # The new Lighthouse numbers its quorums afresh: no group keeps a process group of an
    # old quorum that happens to have the same number (a collective that waits for nobody).
    assert not [e for e in found if e["event"] == "step_failed"]
    assert {e["replica"] for e in found if e["event"] == "quorum_retry"} == {0, 1}
    assert {e["replica"] for e in found if e["event"] == "lighthouse_back"} == {0, 1}
    assert len(set(final_fingerprints(run).values())) == 1


def test_a_hung_torchrun_group_is_killed_with_every_rank_and_healed(tmp_path):
    run = tmp_path / "run"
    proc = start_job(run, "--replicas", "2", "--replicas.ranks_per_group", "2", "--parallel.fsdp", "1",
                     "--train.steps", "3000", "--replicas.hang_timeout_s", "6")  # data parallel inside the group
    try:
        launcher = group_pid_once_all_train(run, groups=2, replica=1)
        # torchrun and the ranks its agent started (in sessions of their own)
        group = [launcher, *wait_for(lambda: descendants(launcher), 30, "the group's ranks")]
        assert len(group) >= 3, group
        for pid in group:  # the whole group wedges
            os.kill(pid, signal.SIGSTOP)
        stopped = time.time()
        hung = wait_for(lambda: events(run, "group_hung"), 30, "the watchdog")[0]
        assert hung["replica"] == 1 and hung["pid"] == launcher and not hung["starting"]
        # hang_timeout_s from its last beat (at most one step before the stop), plus polling and slack
        assert 5 <= hung["time"] - stopped < 6 + 5
        wait_for(lambda: not [p for p in group if alive(p)], 5, "every process of the hung group to be gone")
        wait_for(lambda: [e for e in events(run, "heal") if e["replica"] == 1 and e["time"] > hung["time"]], 90,
                 "the restarted group to heal")
    finally:
        proc.kill()
        proc.wait()
        for pid in group if "group" in locals() else []:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_process_without_the_job_secret_can_pull_no_state(tmp_path):
    port = _free_port()
    lighthouse = _lighthouse(port)
    run = tmp_path / "run"
    common = ["--replicas", "3", "--lighthouse", f"127.0.0.1:{port}"]
    proc = start_job(run, *common, "--groups", "0,1", "--train.steps", "300", env={"STALWART_JOB_SECRET": SECRET})
    try:
        group_pid_once_all_train(run, groups=2, replica=0)
        # An outsider registers with the Lighthouse as group 2, behind the others: it asks a
        # member for the state and is refused.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "STALWART_JOB_SECRET": "a5" * 32}
        outsider = subprocess.run([sys.executable, "-m", "stalwart", "train", "--out", str(tmp_path / "outsider"),
                                   "--recipe", "smoke", "--quiet", *common, "--replica-id", "2", "--train.steps",
                                   "600", "--eval.problems", "0"], capture_output=True, text=True, timeout=120, env=env)
        _, err = proc.communicate(timeout=240)
    finally:
        stop_all(proc, lighthouse)
    assert outsider.returncode == 2, outsider.stderr
    lines = outsider.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not share this job's secret" in lines[0], outsider.stderr
    assert not (tmp_path / "outsider" / "checkpoints").exists() or not list((tmp_path / "outsider" / "checkpoints").iterdir())
    assert not [e for e in events(tmp_path / "outsider", "heal")]  # it never received a state
    assert proc.returncode == 0, err
    assert len(set(final_fingerprints(run).values())) == 1
