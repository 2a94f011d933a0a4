"""Plain torchrun: `torchrun --nproc-per-node N -m stalwart train` is one job with no
Lighthouse, its ranks sharding the model (FSDP2, parallel.fsdp 0: all of them) or data
parallel (parallel.fsdp 1), on one node or several; torchrun's own restart resumes it, and
a resume may change the sharding. Expert parallelism (parallel.ep) splits the routed
experts over the ranks, alone or with FSDP2."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobs import jsonl, wait_for
from stalwart.config import RunConfig

pytestmark = pytest.mark.slow

TRAIN = ["-m", "stalwart", "train", "--recipe", "smoke", "--quiet", "--train.report", "false", "--train.steps", "30", "--checkpoint.every",
         "10", "--train.trace_data", "true", "--eval.problems", "4"]  # generation in step under FSDP2
# OMP_NUM_THREADS: torchrun sets it only with several ranks per node. The store apart: a
# restart must not read the attempt before's addresses (commands/train.py).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
FAULTY = {**ENV, "STALWART_INJECT": "nan-grad@5"}  # every rank's gradients NaN at step 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _assert_ok(r: subprocess.CompletedProcess) -> None:
    """A launch that succeeded; else its ranks' own lines (before torchrun's report) and the report's end."""
    ranks = [line for line in r.stderr.splitlines() if not line.startswith(("  ", "[", "=", "-", "W1", "E1", "I1"))]
    assert r.returncode == 0, "\n".join(ranks[:40]) + "\n...\n" + r.stderr[-1500:]


def _losses(run: Path) -> list[float]:
    return [m["loss"] for m in jsonl(run / "metrics.jsonl")]


def test_torchrun_on_two_nodes_and_a_killed_rank_restarted_by_torchrun_give_the_same_losses(tmp_path):
    # Two nodes of one rank each, through torchrun's c10d rendezvous, uninterrupted.
    nodes_run = tmp_path / "nodes"
    port = _free_port()
    node = _torchrun("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
                     f"127.0.0.1:{port}", "--rdzv-id", "nodes", *TRAIN, "--out", str(nodes_run))
    nodes = [subprocess.Popen(node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=FAULTY)
             for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [err[-2000:] for _, err in outputs]

    # Another launch on the same --out is refused, and torchrun's restart of it is not
    # taken for a restart of the run that is there.
    before = (nodes_run / "metrics.jsonl").read_text()
    again = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", *TRAIN,
                                     "--out", str(nodes_run)), capture_output=True, text=True, timeout=240, env=ENV)
    assert again.returncode != 0 and again.stderr.count("already holds a run") >= 4  # both ranks, both attempts
    assert (nodes_run / "metrics.jsonl").read_text() == before

    # One node of two ranks with --max-restarts 1; rank 1 SIGKILLed from outside once step 10 is on disk.
    restarted_run = tmp_path / "restarted"
    job = subprocess.Popen(_torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", *TRAIN,
                                     "--out", str(restarted_run)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=FAULTY)
    try:
        events = restarted_run / "events.jsonl"
        wait_for(lambda: events.exists() and any(e["event"] == "checkpoint" for e in jsonl(events)), 120,
                 "the first checkpoint")
        rank1 = [e["pids"] for e in jsonl(events) if e["event"] == "start"][-1][1]
        os.kill(rank1, signal.SIGKILL)
        _, err = job.communicate(timeout=240)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err[-2000:]

    # Rank 0 SIGKILLed while it writes the checkpoint of step 20 (the shards on disk, no
    # manifest yet): torchrun's restart resumes from step 10, the torn folder never counts.
    torn_run = tmp_path / "torn"
    r = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", *TRAIN,
                                 "--out", str(torn_run)), capture_output=True, text=True, timeout=240,
                       env={**FAULTY, "STALWART_INJECT": "nan-grad@5,kill-in-checkpoint@20:0"})
    _assert_ok(r)
    assert [e["step"] for e in jsonl(torn_run / "events.jsonl") if e["event"] == "resume"] == [10]
    assert [e["step"] for e in jsonl(torn_run / "events.jsonl") if e["event"] == "checkpoint"] == [10, 20, 30]
    (removed,) = [e["path"] for e in jsonl(torn_run / "events.jsonl") if e["event"] == "checkpoint_partial_removed"]
    assert ".step-000020." in removed  # by the restarted writer, before its own save
    assert sorted(d.name for d in (torn_run / "checkpoints").iterdir()) == ["step-000020", "step-000030"]  # keep 2

    for run in (nodes_run, restarted_run, torn_run):
        metrics = jsonl(run / "metrics.jsonl")
        assert [m["step"] for m in metrics] == list(range(1, 31))
        assert {m["rank"] for m in metrics} == {0}  # rank 0 alone writes the run's files
        assert all(set(m["data"]) == {"0", "1"} and m["tokens"] == 2 * 4 * 64 * m["step"] for m in metrics)
        assert {e["rank"] for e in jsonl(run / "events.jsonl") if e["event"] == "checkpoint"} == {0}
        assert (run / "export" / "config.json").exists()
        skipped = [e for e in jsonl(run / "events.jsonl") if e["event"] == "step_skipped"]
        assert [(e["step"], e["guard"]) for e in skipped] == [(5, "nonfinite")]  # every rank skipped it
    resumed = [e for e in jsonl(restarted_run / "events.jsonl") if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 10  # torchrun's restart resumed the run
    assert _losses(restarted_run) == _losses(nodes_run) == _losses(torn_run)  # bit for bit

    # The same state at step 30 resumed sharded (FSDP 2) and not (parallel.fsdp 1): the
    # sharded checkpoint (each rank wrote its own shards) loads into either, and they train
    # on alike (up to the sums' order).
    assert not (nodes_run / "checkpoints" / "step-000030" / "model.safetensors").exists()
    for run, sharding in ((restarted_run, "0"), (nodes_run, "1")):
        r = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", *TRAIN, "--out", str(run), "--resume",
                                     "--train.steps", "36", "--parallel.fsdp", sharding),
                           capture_output=True, text=True, timeout=240, env=ENV)
        _assert_ok(r)
        assert json.loads((run / "config.json").read_text())["parallel"]["fsdp"] == int(sharding)
        assert [e["step"] for e in jsonl(run / "events.jsonl") if e["event"] == "resume"][-1] == 30
    held = {run.name: [e["parameter_bytes"] for e in jsonl(run / "events.jsonl") if e["event"] == "start"][-1]
            for run in (restarted_run, nodes_run)}
    whole = 4 * [e for e in jsonl(nodes_run / "events.jsonl") if e["event"] == "start"][0]["parameters"]
    assert held["nodes"] == [whole, whole]  # data parallel: every rank holds every parameter
    assert all(0.45 * whole <= b <= 0.55 * whole for b in held["restarted"])  # FSDP 2: half each
    sharded, plain = _losses(restarted_run)[30:], _losses(nodes_run)[30:]
    assert len(sharded) == len(plain) == 6
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(sharded, plain)), (sharded, plain)


@pytest.mark.parametrize("extra, words", [
    (["--replicas", "2"], "replica groups start their own ranks"),
    (["--parallel.fsdp", "3"], "parallel.fsdp 3 must divide the launch's 2 ranks"),
    (["--parallel.ep", "4"], "parallel.ep 4 must divide the launch's 2 ranks"),
])
def test_torchrun_refuses_what_its_ranks_cannot_do_in_one_line(extra, words, tmp_path):
    run = tmp_path / "run"
    r = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", *TRAIN, *extra, "--out", str(run)),
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode != 0
    assert f"stalwart train: error: {words}" in r.stderr
    assert not run.exists()


def test_a_rank_under_torchrun_restarts_with_a_shared_store_is_refused_in_one_line(tmp_path):
    # What torchrun --max-restarts 1 gives a rank, the store shared (checked before the ranks meet).
    rank = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "TORCHELASTIC_MAX_RESTARTS": "1",
            "TORCHELASTIC_USE_AGENT_STORE": "True"}
    r = subprocess.run([sys.executable, *TRAIN, "--out", str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=60, env=rank)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "torchrun --max-restarts shares its store" in r.stderr and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in r.stderr
    assert not (tmp_path / "run").exists()



def _moments(run: Path) -> dict[int, dict[str, torch.Tensor]]:
    """AdamW's moments at a run's newest checkpoint, whole: from train_state, or read from a
    sharded checkpoint's shards in this one process (torch.distributed.checkpoint reshards)."""
    from stalwart import checkpoint as ckpt

    latest = ckpt.load_latest(run / "checkpoints")
    assert latest.step == 20
    state = latest.train_state
    if not latest.sharded:
        return state["optimizer"]["state"]
    from stalwart.model import DeepSeekForCausalLM
    from stalwart.training.optim import build_optimizer

    cfg = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    params = [p for group in build_optimizer(DeepSeekForCausalLM(cfg.model), cfg.optim).param_groups
              for p in group["params"]]  # the optimizer's order, which its state's indices follow
    whole = {int(i): {k: torch.zeros_like(params[int(i)]) for k in names} for i, names in state["moments"].items()}
    ckpt.read_sharded(latest.path, {f"optimizer.{i}.{k}": t for i, per in whole.items() for k, t in per.items()},
                      collective=False)
    assert {f.name for f in latest.path.glob("shard-*.safetensors")} == {
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"}
    return whole


def _expert_bytes(run: Path) -> int:
    """Bytes of the routed experts' weights of a run's model (fp32)."""
    from stalwart.model import DeepSeekForCausalLM
    from stalwart.model.moe import RoutedExperts

    model = DeepSeekForCausalLM(RunConfig.from_dict(json.loads((run / "config.json").read_text())).model)
    return 4 * sum(p.numel() for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters())


def test_expert_parallelism_trains_as_data_parallelism_does_and_resumes_on_another_layout(tmp_path):
    # Two ranks, 20 steps: data parallel; experts split in two (EP 2); EP 2 with FSDP2. In
    # each, rank 1's expert gradient is NaN at step 5 (with EP: only the experts it holds,
    # which no other rank sees): every rank must skip that step, as one process would. The
    # exports are fp32, so that the gathered folder equals the last checkpoint (below).
    layouts = {"dp": ("1", "1"), "ep": ("1", "2"), "ep_fsdp": ("0", "2")}
    for name, (fsdp, ep) in layouts.items():
        r = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", *TRAIN, "--train.steps", "20",
                                     "--parallel.fsdp", fsdp, "--parallel.ep", ep, "--export.dtype", "fp32",
                                     "--out", str(tmp_path / name)),
                           capture_output=True, text=True, timeout=240,
                           env={**ENV, "STALWART_INJECT": "nan-expert-grad@5:1"})
        _assert_ok(r)
    runs = {name: tmp_path / name for name in layouts}
    for name, run in runs.items():
        skipped = [e for e in jsonl(run / "events.jsonl") if e["event"] == "step_skipped"]
        assert [e["step"] for e in skipped] == [5], (name, skipped)
    start = {name: [e for e in jsonl(run / "events.jsonl") if e["event"] == "start"][0] for name, run in runs.items()}
    whole, experts = 4 * start["dp"]["parameters"], _expert_bytes(runs["dp"])
    assert start["dp"]["parameter_bytes"] == [whole, whole]
    assert start["ep"]["parameter_bytes"] == [whole - experts // 2] * 2  # half the experts each
    assert start["ep_fsdp"]["parameter_bytes"] == [whole // 2] * 2  # the experts by EP, the rest by FSDP
    # The same batches, routing, losses and gradient norms: an expert's rows are summed in
    # another order (measured: at most 1.2e-7 relative over the 20 steps), and the global
    # expert load moves every rank's routing bias alike. The norm is taken before AdamW,
    # which would hide an expert gradient of the wrong scale; its moments would not.
    metrics = {name: jsonl(run / "metrics.jsonl") for name, run in runs.items()}
    for name in ("ep", "ep_fsdp"):
        assert [m["step"] for m in metrics[name]] == list(range(1, 21))
        for key in ("loss", "grad_norm", "expert_imbalance"):
            assert [m[key] for m in metrics[name]] == pytest.approx([m[key] for m in metrics["dp"]], rel=1e-5), \
                (name, key)
    moments = {name: _moments(run) for name, run in runs.items()}
    for name in ("ep", "ep_fsdp"):  # of each tensor's largest: 1e-4 (measured 3e-6; a near-zero mean cancels)
        assert moments[name].keys() == moments["dp"].keys()
        for index, per_param in moments["dp"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                want, got = per_param[key], moments[name][index][key]
                assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (name, index, key)

    # The export of the sharded run, gathered to rank 0, is the whole model of its last
    # checkpoint (read here shard by shard into one process): transformers loads it with the
    # same logits.
    transformers = pytest.importorskip("transformers")
    from stalwart.model_source import load_run

    ours, _ = load_run(runs["ep_fsdp"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(runs["ep_fsdp"] / "export", dtype=torch.float32)
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(tokens).logits, ours.eval()(tokens).logits, rtol=1e-4, atol=1e-4)

    # Resumed from the step-20 checkpoint on another layout (EP 2's sharded one -> 1; the
    # data-parallel run's whole one -> EP 2 with FSDP), against the data-parallel run
    # resumed as it was.
    shutil.copytree(runs["dp"], tmp_path / "dp_again")
    for name, (fsdp, ep) in (("ep", ("1", "1")), ("dp", ("0", "2")), ("dp_again", ("1", "1"))):
        r = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", *TRAIN, "--train.steps", "24",
                                     "--parallel.fsdp", fsdp, "--parallel.ep", ep, "--resume",
                                     "--out", str(tmp_path / name)), capture_output=True, text=True, timeout=240,
                           env=ENV)
        _assert_ok(r)
        assert [e["step"] for e in jsonl(tmp_path / name / "events.jsonl") if e["event"] == "resume"] == [20]
    reference = _losses(tmp_path / "dp_again")[20:]
    assert len(reference) == 4
    for name in ("ep", "dp"):
        assert _losses(tmp_path / name)[20:] == pytest.approx(reference, rel=1e-5), name

    # --model.from a folder on shards: each rank cuts the folder's tensors to its part. Started
    # from the data-parallel run's export, EP 2 with FSDP trains the losses data parallelism does.
    for name, (fsdp, ep) in (("from_dp", ("1", "1")), ("from_ep_fsdp", ("0", "2"))):
        r = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", *TRAIN, "--train.steps", "3",
                                     "--parallel.fsdp", fsdp, "--parallel.ep", ep, "--model.from",
                                     str(runs["dp"] / "export"), "--out", str(tmp_path / name)),
                           capture_output=True, text=True, timeout=240, env=ENV)
        _assert_ok(r)
    started = _losses(tmp_path / "from_dp")
    assert started[0] < _losses(runs["dp"])[0] / 2  # the folder's trained weights, not a random start
    assert _losses(tmp_path / "from_ep_fsdp") == pytest.approx(started, rel=1e-5)


def test_four_ranks_reshard_on_resume_whole_to_four_shards_and_four_to_two(tmp_path):
    # One 4-rank launch, data parallel (parallel.fsdp 1: whole checkpoints), resumed at step
    # 10 sharded in four (FSDP 4), whose last checkpoint (four ranks' shards) is resumed in
    # two (FSDP 2 over ranks 0-1 and 2-3, each pair holding all of it); against the
    # data-parallel run resumed as it was. The data shards are the launch's four throughout.
    # Measured: the losses of steps 11-14 equal to 5 decimals.
    def launch(run: Path, steps: int, fsdp: str, *extra: str) -> None:
        r = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "4", *TRAIN, "--eval.problems", "0",
                                     "--train.steps", str(steps), "--parallel.fsdp", fsdp, "--out", str(run), *extra),
                           capture_output=True, text=True, timeout=300, env=ENV)
        _assert_ok(r)

    whole, resharded = tmp_path / "whole", tmp_path / "resharded"
    launch(whole, 10, "1")
    assert (whole / "checkpoints" / "step-000010" / "model.safetensors").exists()
    shutil.copytree(whole, resharded)
    launch(resharded, 14, "4", "--resume")
    shards = sorted(f.name for f in (resharded / "checkpoints" / "step-000014").glob("shard-*.safetensors"))
    assert len(shards) == 4, shards
    held = [e["parameter_bytes"] for e in jsonl(resharded / "events.jsonl") if e["event"] == "start"][-1]
    parameters = [e for e in jsonl(whole / "events.jsonl") if e["event"] == "start"][0]["parameters"]
    assert all(0.2 * 4 * parameters <= b <= 0.3 * 4 * parameters for b in held), held  # a quarter each
    launch(resharded, 18, "2", "--resume")
    for steps in (14, 18):  # the same resumes (train.steps sets the learning rate's schedule)
        launch(whole, steps, "1", "--resume")
    for run in (whole, resharded):
        assert [e["step"] for e in jsonl(run / "events.jsonl") if e["event"] == "resume"] == [10, 14]
    got, want = _losses(resharded), _losses(whole)
    assert [m["step"] for m in jsonl(resharded / "metrics.jsonl")] == list(range(1, 19))
    assert got[:10] == want[:10]
    assert got[10:] == pytest.approx(want[10:], rel=1e-5), (got[10:], want[10:])  # the sums' order only

    # Resumed on 2 ranks: the data shards would change. Each rank says so in one line (exit
    # 2; torchrun adds its own report), and the run is left as it was.
    before = (resharded / "metrics.jsonl").read_text()
    r = subprocess.run(_torchrun("--standalone", "--nproc-per-node", "2", *TRAIN, "--eval.problems", "0",
                                 "--train.steps", "20", "--out", str(resharded), "--resume"),
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode != 0 and "exitcode: 2" in r.stderr
    assert r.stderr.count("stalwart train: error: checkpoint ") == 2 and "has 4 data shards but this job has 2" \
        in r.stderr, r.stderr[-2000:]
    assert (resharded / "metrics.jsonl").read_text() == before
    assert sorted(d.name for d in (resharded / "checkpoints").iterdir()) == ["step-000014", "step-000018"]
