"""Shared by the replica-group tests: start a real job (supervisor, Lighthouse, one process
per group), wait for it to train, read its run directory. Each job is a few hundred
milliseconds of training per step count and bounded in time."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

FAST = ["--recipe", "smoke", "--quiet", "--train.report", "false", "--guards.fingerprint_every", "5", "--replicas.timeout_s", "3",
        "--replicas.heartbeat_timeout_s", "1", "--eval.problems", "0"]


def job(out: Path, *extra: str, inject: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STALWART_INJECT": inject}
    return subprocess.run([sys.executable, "-m", "stalwart", "train", "--out", str(out), *FAST, *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def start_job(out: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    """A job left running, for tests that signal its groups."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "stalwart", "train", "--out", str(out), *FAST, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def group_pid_once_all_train(run: Path, *, groups: int, replica: int, timeout: float = 120) -> int:
    """The pid of `replica`'s current process, once all `groups` have committed step 10 together."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
        if any(m["step"] >= 10 and m["participants"] == groups for m in metrics):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the {groups} groups did not train together within {timeout:.0f} s")
    return [e["pid"] for e in jsonl(run / "events.jsonl") if e["event"] == "group_start" and e["replica"] == replica][-1]


def kill_rank_once_all_train(run: Path, proc: subprocess.Popen, *, groups: int, replica: int, rank: int,
                             timeout: float) -> tuple[float, str]:
    """SIGKILL torchrun's rank `rank` of group `replica` from outside, once all `groups`
    train together (at no step boundary of its choosing), and wait for the job: the time of
    the kill and the job's stderr. The job is stopped whatever happens."""
    try:
        launcher = group_pid_once_all_train(run, groups=groups, replica=replica)
        pid = wait_for(lambda: [p for p in descendants(launcher) if torchrun_rank(p) == rank], 30, f"rank {rank}")[0]
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=timeout)
    finally:
        stop_all(proc)
    return killed, err


def jsonl(path: Path) -> list[dict]:
    """The complete records of a JSON-lines file another process may be appending to: a
    reader can see a write in progress (Linux copies it page by page), so an unterminated last
    line is left for the next read; a complete line that does not parse still fails."""
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def final_fingerprints(run: Path) -> dict[int, str]:
    return {e["replica"]: e["fingerprint"] for e in jsonl(run / "events.jsonl") if e["event"] == "finish"}


SECRET = "5a" * 32  # a job secret for jobs whose groups the test starts itself


def wait_for(predicate, timeout: float, what: str):
    """Poll `predicate` every 0.1 s until it returns something true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def events(run: Path, kind: str | None = None) -> list[dict]:
    path = run / "events.jsonl"
    found = jsonl(path) if path.exists() else []
    return [e for e in found if kind is None or e["event"] == kind]


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def descendants(pid: int) -> list[int]:
    """Live processes below `pid` in the process tree (torchrun's ranks run in sessions of
    their own, so their session id does not find them; their parent does)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def stop_all(*procs: subprocess.Popen) -> None:
    """Kill whatever of `procs` still runs (a test's cleanup, whatever it failed on)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def positions_of_shard(run: Path, shard: int) -> list[str]:
    """Every loader position shard `shard` reached, batch by batch, from an untouched loader."""
    from stalwart.data.loader import PackedLoader, TaskDocuments
    from stalwart.data.tokenizer import load_tokenizer

    cfg = json.loads((run / "config.json").read_text())
    d, t = cfg["data"], cfg["train"]
    loader = PackedLoader(TaskDocuments(d["task"], "train", d["seed"], d["min_digits"], d["max_digits"]),
                          load_tokenizer(run), seq_len=d["seq_len"], batch_size=t["batch_size"], seed=d["seed"],
                          shard=shard, num_shards=cfg["replicas"]["count"] * cfg["replicas"]["ranks_per_group"])
    positions = []
    for _ in range(t["steps"]):
        loader.next_batch()
        positions.append(":".join(str(v) for v in loader.state_dict().values()))
    return positions


def in_process(*argv: str) -> subprocess.CompletedProcess:
    """`python -m stalwart ARGV` run in this process, for input rejected before any work
    (no interpreter and torch import per case); an exception shows up as a traceback in
    stderr, as it would from the command."""
    from stalwart.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code
        except Exception:  # noqa: BLE001
            traceback.print_exc(file=err)
            code = 1
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def torchrun_rank(pid: int) -> int | None:
    """The RANK torchrun gave a process (None for one it did not start)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return None
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


def foreign_tokenizer():
    """Another project's byte-level BPE tokenizer (300 tokens): special tokens <unk>, <s>,
    </s>, <pad> at ids 0-3, not stalwart's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from stalwart.data.tokenizer import default_corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(default_corpus(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return tok
