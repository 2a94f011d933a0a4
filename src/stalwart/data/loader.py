"""Documents and the packed, resumable, shardable loader.

A document is a (prompt, completion) pair of strings; the loss covers the completion and
its eos, not the prompt (for plain text the prompt is empty). Documents are addressed by
an integer index, so the loader's whole position is two numbers and a few carried tokens:
it is saved in every checkpoint and restores the exact same batches.

Sharding: shard s of n takes documents s, s + n, s + 2n, ... of the stream, so ranks and
replica groups see disjoint data without talking to each other.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from stalwart.data.tasks import make_problem
from stalwart.data.tokenizer import EOS_ID
from stalwart.errors import ConfigError, UserError
from stalwart.model import IGNORE_INDEX


class Documents(Protocol):
    def __len__(self) -> int: ...  # 0 means unbounded
    def document(self, index: int) -> tuple[str, str]: ...


@dataclass(frozen=True)
class TaskDocuments:
    """An unbounded stream of generated problems of one split."""

    task: str
    split: str
    seed: int
    min_digits: int
    max_digits: int

    def __len__(self) -> int:
        return 0

    def document(self, index: int) -> tuple[str, str]:
        p = make_problem(self.task, self.split, index, self.seed, self.min_digits, self.max_digits)
        return p.prompt, p.solution


class TextDocuments:
    """User data: .txt files (one document per blank-line-separated paragraph) and .jsonl
    files (one document per line, its `text` field). Every 64th document is held out for
    the eval split; with fewer than 64 documents there is no eval split."""

    def __init__(self, paths: Sequence[str], split: str) -> None:
        docs: list[str] = []
        for path in map(Path, paths):
            try:
                raw = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"cannot read data file {path}: {getattr(e, 'strerror', None) or e}") from None
            if path.suffix == ".jsonl":
                for n, line in enumerate(raw.splitlines(), start=1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise UserError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
                    if not isinstance(text, str):
                        raise UserError(f"{path}:{n}: 'text' must be a string")
                    docs.append(text)
            else:
                docs += [p.strip() for p in raw.split("\n\n") if p.strip()]
        if not docs:
            raise UserError(f"no documents in {', '.join(paths) or 'data.files (empty)'}")
        held_out = [d for i, d in enumerate(docs) if i % 64 == 63]
        self.docs = held_out if split == "eval" else [d for i, d in enumerate(docs) if i % 64 != 63]

    def __len__(self) -> int:
        return len(self.docs)

    def document(self, index: int) -> tuple[str, str]:
        return "", self.docs[index]


class PackedLoader:
    """Concatenates tokenised documents (each followed by eos) and cuts (B, T) batches.

    Finite corpora are read in a fresh seeded permutation each epoch. The state is
    {"position": documents consumed by this shard, "carry": tokens left over}.
    """

    def __init__(self, docs: Documents, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                 shard: int = 0, num_shards: int = 1) -> None:
        if not 0 <= shard < num_shards:
            raise ConfigError(f"shard {shard} is not in 0..{num_shards - 1}")
        if len(docs) and len(docs) < num_shards:
            raise UserError(f"{len(docs)} documents cannot be sharded {num_shards} ways")
        self.docs, self.tok = docs, tokenizer
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.shard, self.num_shards = shard, num_shards
        self.position = 0
        self.carry_ids: list[int] = []
        self.carry_mask: list[bool] = []
        self._perm: tuple[int, list[int]] | None = None

    def _doc_index(self, position: int) -> int:
        n = len(self.docs)
        if n == 0:
            return self.shard + position * self.num_shards
        per_shard = n // self.num_shards
        epoch, offset = divmod(position, per_shard)
        if self._perm is None or self._perm[0] != epoch:
            order = list(range(n))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._perm = (epoch, order)
        return self._perm[1][self.shard + offset * self.num_shards]

    def _fill(self, need: int) -> None:
        while len(self.carry_ids) < need:
            prompts, completions = zip(*(self.docs.document(self._doc_index(self.position + i)) for i in range(64)))
            self.position += 64
            enc_p = self.tok.encode_batch(list(prompts), add_special_tokens=False)
            enc_c = self.tok.encode_batch(list(completions), add_special_tokens=False)
            for p, c in zip(enc_p, enc_c):
                self.carry_ids += p.ids + c.ids + [EOS_ID]
                self.carry_mask += [False] * len(p.ids) + [True] * (len(c.ids) + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) and labels (B, T): labels[t] is token t+1 where it is trained on."""
        rows = self.batch_size * (self.seq_len + 1)
        self._fill(rows)
        ids = torch.tensor(self.carry_ids[:rows], dtype=torch.long).view(self.batch_size, -1)
        mask = torch.tensor(self.carry_mask[:rows], dtype=torch.bool).view(self.batch_size, -1)
        del self.carry_ids[:rows], self.carry_mask[:rows]
        labels = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
        return ids[:, :-1].contiguous(), labels.contiguous()

    def state_dict(self) -> dict:
        return {"position": self.position, "carry_ids": torch.tensor(self.carry_ids, dtype=torch.long),
                "carry_mask": torch.tensor(self.carry_mask, dtype=torch.bool)}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self.carry_ids = state["carry_ids"].tolist()
        self.carry_mask = state["carry_mask"].tolist()
