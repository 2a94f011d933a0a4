"""Documents and the packed, resumable, shardable loader.

A document is a (prompt, completion) pair of strings; the loss covers the completion and
its eos, not the prompt (for plain text the prompt is empty). Documents are addressed by
an integer index, so the loader's whole position is three integers (`LOADER_STATE`): the
documents read, the first document whose tokens are still carried, and how many tokens of
those carried documents are already used. The carried tokens themselves are rebuilt from
the documents on load, so the position is small enough to travel in every replicated step
(train/exchange.py) and restores the exact same batches.

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


CHUNK = 64  # documents tokenised at a time
LOADER_STATE = ("position", "start", "skip")  # the loader's whole state, in this order


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

    Finite corpora are read in a fresh seeded permutation each epoch. Documents are
    tokenised 64 at a time (a chunk); the state is {"position": documents of this shard
    read, "start": the first document of the oldest chunk still carried, "skip": tokens of
    the carried chunks already cut into batches}.
    """

    def __init__(self, docs: Documents, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                 shard: int = 0, num_shards: int = 1, eos_id: int = EOS_ID) -> None:
        if not 0 <= shard < num_shards:
            raise ConfigError(f"shard {shard} is not in 0..{num_shards - 1}")
        if len(docs) and len(docs) < num_shards:
            raise UserError(f"{len(docs)} documents cannot be sharded {num_shards} ways")
        self.docs, self.tok, self.eos_id = docs, tokenizer, eos_id  # the model config's eos ends each document
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.shard, self.num_shards = shard, num_shards
        self.position = self.start = self.skip = 0
        self.carry_ids: list[int] = []  # tokens of the chunks from `start` on, minus `skip` used ones
        self.carry_mask: list[bool] = []
        self._chunk_lens: list[int] = []  # tokens of each carried chunk, oldest first
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

    def _read_chunk(self) -> None:
        prompts, completions = zip(*(self.docs.document(self._doc_index(self.position + i)) for i in range(CHUNK)))
        self.position += CHUNK
        enc_p = self.tok.encode_batch(list(prompts), add_special_tokens=False)
        enc_c = self.tok.encode_batch(list(completions), add_special_tokens=False)
        before = len(self.carry_ids)
        for p, c in zip(enc_p, enc_c):
            self.carry_ids += p.ids + c.ids + [self.eos_id]
            self.carry_mask += [False] * len(p.ids) + [True] * (len(c.ids) + 1)
        self._chunk_lens.append(len(self.carry_ids) - before)

    def _fill(self, need: int) -> None:
        while len(self.carry_ids) < need:
            self._read_chunk()

    def _consume(self, n: int) -> None:
        del self.carry_ids[:n], self.carry_mask[:n]
        self.skip += n
        while self._chunk_lens and self.skip >= self._chunk_lens[0]:
            self.skip -= self._chunk_lens.pop(0)
            self.start += CHUNK

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) and labels (B, T): labels[t] is token t+1 where it is trained on."""
        rows = self.batch_size * (self.seq_len + 1)
        self._fill(rows)
        ids = torch.tensor(self.carry_ids[:rows], dtype=torch.long).view(self.batch_size, -1)
        mask = torch.tensor(self.carry_mask[:rows], dtype=torch.bool).view(self.batch_size, -1)
        self._consume(rows)
        labels = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
        return ids[:, :-1].contiguous(), labels.contiguous()

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "start": self.start, "skip": self.skip}

    def load_state_dict(self, state: dict) -> None:
        """Go to a saved position: the carried chunks are read again from `start`."""
        position, start, skip = (int(state[k]) for k in LOADER_STATE)
        if start % CHUNK or position % CHUNK or not 0 <= start <= position:
            raise ValueError(f"not a loader position: {state}")
        self.position = self.start = start
        self.skip = 0
        self.carry_ids, self.carry_mask, self._chunk_lens = [], [], []
        while self.position < position:
            self._read_chunk()
        self._consume(skip)
