"""The baseline of bench/faults.py: torchft's fault-tolerant DDP used as its documentation
shows it, on stalwart's `tiny` model and the same data shard per replica group.

- `torchft.ddp.DistributedDataParallel` and `torchft.optim.OptimizerWrapper` over a
  `torchft.Manager` with its default settings (asynchronous quorum, 60 s timeouts, its own
  HTTP checkpoint transport for heals), and `ProcessGroupGloo`;
- one process per replica group, started by `torchrun --max-restarts N`, which restarts it
  after a crash, with the Lighthouse run as `torchft_lighthouse --min_replicas 1
  --quorum_tick_ms 100 --join_timeout_ms 10000` (the flags of TorchTitan's torchft guide);
- REPLICA_GROUP_ID, NUM_REPLICA_GROUPS, TORCHFT_LIGHTHOUSE and BENCH_RUN_DIR (holding the
  run's tokenizer.json) come from the environment.

It trains what stalwart trains (same model config, optimizer, batches per shard) without
stalwart's extras: no MoE bias update (torchft's DDP has no place for it), no guards. For a
device that produces NaN, SIGUSR1 makes every later loss of this process NaN. Per committed
step it appends what stalwart's metrics.jsonl holds (step, time, step_s, loss,
participants, tokens_per_s, replica), so that bench/faults.py reads both runs alike.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch
from torchft import Manager
from torchft.ddp import DistributedDataParallel
from torchft.optim import OptimizerWrapper
from torchft.process_group import ProcessGroupGloo

from stalwart.data.loader import PackedLoader
from stalwart.data.sources import documents
from stalwart.data.tokenizer import load_tokenizer
from stalwart.model import DeepSeekForCausalLM
from stalwart.recipes import recipe
from stalwart.training.optim import build_optimizer


def main() -> None:
    replica, groups = int(os.environ["REPLICA_GROUP_ID"]), int(os.environ["NUM_REPLICA_GROUPS"])
    run = Path(os.environ["BENCH_RUN_DIR"])
    cfg = recipe("default")
    torch.manual_seed(cfg.train.seed)
    model = DeepSeekForCausalLM(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    loader = PackedLoader(documents(cfg.data, "train"), load_tokenizer(run), seq_len=cfg.data.seq_len,
                          batch_size=cfg.train.batch_size, seed=cfg.data.seed, shard=replica, num_shards=groups)

    def state_dict() -> dict:
        return {"model": model.state_dict(), "optim": optimizer.state_dict()}

    def load_state_dict(state: dict) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optim"])

    manager = Manager(pg=ProcessGroupGloo(), min_replica_size=1, load_state_dict=load_state_dict,
                      state_dict=state_dict, replica_id=f"train_ddp_{replica}")
    ddp = DistributedDataParallel(manager, model)
    wrapped = OptimizerWrapper(manager, optimizer)
    poisoned = []
    signal.signal(signal.SIGUSR1, lambda *_: poisoned.append(True))
    tokens = cfg.train.batch_size * cfg.data.seq_len
    metrics = run / "metrics.jsonl"
    while True:
        t0 = time.perf_counter()
        wrapped.zero_grad()  # starts the quorum
        x, y = loader.next_batch()
        loss = ddp(x, labels=y).loss * (float("nan") if poisoned else 1.0)
        loss.backward()  # gradients are averaged across groups by DDP's communication hook
        before = manager.current_step()
        wrapped.step()  # the commit vote, then AdamW
        if manager.current_step() > before:
            dt = time.perf_counter() - t0
            n = manager.num_participants()
            record = {"step": manager.current_step(), "time": round(time.time(), 4), "step_s": dt,
                      "loss": float(loss), "participants": n, "tokens_per_s": tokens * n / dt, "replica": replica}
            fd = os.open(metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(fd, (json.dumps(record) + "\n").encode())
            os.close(fd)


if __name__ == "__main__":
    main()
