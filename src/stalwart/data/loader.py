"""Documents and the packed, resumable, shardable loader.

A document is a sequence of (prompt, answer) turns of strings: one for a generated problem
or plain text (whose prompt is empty), one per assistant message for a conversation
(data/chat.py). The loss covers each answer and the eos after it, not the prompts. Documents are addressed by
an integer index, so the loader's whole position is three integers (`LOADER_STATE`): the
documents read, the first document whose tokens are still carried, and how many tokens of
those carried documents are already used. The carried tokens themselves are rebuilt from
the documents on load, so the position is small enough to travel in every replicated step
(training/exchange.py) and restores the exact same batches.

Sharding: shard s of n takes documents s, s + n, s + 2n, ... of the stream, so ranks and
replica groups see disjoint data without talking to each other.

A finite corpus is read in a new order each epoch, drawn from the seed and the epoch: its
blocks of SHUFFLE_BLOCK documents in a shuffled order (the short last block last), each
block shuffled within. A corpus of up to 4096 documents is thus fully shuffled, a larger
one is read a block at a time (data/files.py decodes a page of records at a time), and the
order needs memory for one block and the block order, not for every document.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from stalwart.data.chat import record_turns
from stalwart.data.files import PAGE, RecordFile, open_corpus
from stalwart.data.tasks import make_problem
from stalwart.data.tokenizer import EOS_ID
from stalwart.errors import ConfigError, UserError
from stalwart.model import IGNORE_INDEX


CHUNK = 64  # documents tokenised at a time
SHUFFLE_BLOCK = 4096  # an epoch's order: blocks of this many documents shuffled, and shuffled within
EVAL_EVERY = 64  # every 64th document of user files is held out
LOADER_STATE = ("position", "start", "skip")  # the loader's whole state, in this order


class Documents(Protocol):
    def __len__(self) -> int: ...  # 0 means unbounded
    def document(self, index: int) -> tuple[tuple[str, str], ...]: ...  # its (prompt, answer) turns


def text_of(document: tuple[tuple[str, str], ...]) -> str:
    """A document's whole text, its prompts and answers in order (what a tokenizer learns from)."""
    return "".join(prompt + answer for prompt, answer in document)


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

    def document(self, index: int) -> tuple[tuple[str, str], ...]:
        p = make_problem(self.task, self.split, index, self.seed, self.min_digits, self.max_digits)
        return ((p.prompt, p.solution),)


class FileDocuments:
    """User data (data/files.py: .txt, .jsonl, .parquet, saved datasets), read a page at a
    time. `format` "text": a record is a .txt paragraph, or the string in its `field`;
    "chat": its `field` holds a list of messages, or it has prompt and completion strings
    (data/chat.py). Every 64th record is held out for the eval split; with fewer than 64
    records there is no eval split. A record that does not fit the format stops the run
    with one line naming its file and line or row; each file's first page (a table's
    columns) is checked now."""

    def __init__(self, paths: Sequence[str], split: str, *, format: str = "text", field: str = "text") -> None:
        self.format, self.field = format, field
        self._pages: OrderedDict[tuple[int, int], list] = OrderedDict()  # the last pages decoded
        self.corpus = open_corpus(paths)
        self._columns = {id(f): self._check(f) for f in self.corpus.files}
        total = len(self.corpus)
        if not total:
            raise UserError(f"no documents in {', '.join(paths) or 'data.files (empty)'}")
        self.eval = split == "eval"
        self.size = total // EVAL_EVERY if self.eval else total - total // EVAL_EVERY

    def _check(self, f: RecordFile) -> tuple[str, ...]:
        """The columns of `f` this format reads (none for free-form records, whose first
        record is checked); a file that cannot hold the format is refused."""
        if f.columns is None:
            if f.path.suffix == ".txt" and self.format == "chat":
                raise UserError(f"{f.path}: data.format chat reads .jsonl, .parquet or saved datasets, not .txt")
            if len(f):
                self._turns(f, 0, ())
            return ()
        strings = ("string", "large_string")
        if self.format == "text" and f.columns.get(self.field) in strings:
            return (self.field,)
        if self.format == "chat" and self.field in f.columns:
            return (self.field,)
        if self.format == "chat" and f.columns.get("prompt") in strings and f.columns.get("completion") in strings:
            return ("prompt", "completion")
        if self.field in f.columns:
            raise UserError(f"data.field {self.field!r} of {f.path} holds {f.columns[self.field]}, not text")
        raise UserError(f"data.field {self.field!r} is not a column of {f.path} (columns: {', '.join(f.columns)})")

    def __len__(self) -> int:
        return self.size

    def _record(self, f: RecordFile, i: int, columns: tuple[str, ...]):
        key = (id(f), i // PAGE)
        if key not in self._pages:
            self._pages[key] = f.page(i // PAGE, columns)
            while len(self._pages) > 8:  # two shuffle blocks' worth
                self._pages.popitem(last=False)
        return self._pages[key][i % PAGE]

    def _turns(self, f: RecordFile, i: int, columns: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
        record = self._record(f, i, columns)
        if self.format == "chat":
            try:
                return record_turns(record, self.field)
            except ValueError as e:
                raise UserError(f"{f.where(i)}: {e}") from None
        text = record if isinstance(record, str) else record.get(self.field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{f.where(i)}: expected a record with a string {self.field!r} field (data.field)")
        return (("", text),)

    def document(self, index: int) -> tuple[tuple[str, str], ...]:
        g = index * EVAL_EVERY + EVAL_EVERY - 1 if self.eval else index // (EVAL_EVERY - 1) * EVAL_EVERY + \
            index % (EVAL_EVERY - 1)
        f, i = self.corpus.locate(g)
        return self._turns(f, i, self._columns[id(f)])


class PackedLoader:
    """Concatenates tokenised documents (each followed by eos) and cuts (B, T) batches.

    Finite corpora are read in a fresh seeded order each epoch. Documents are
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
        self._blocks: tuple[int, list[int]] | None = None  # an epoch's block order
        self._perm: tuple[tuple[int, int], list[int]] | None = None  # one block's order

    def _doc_index(self, position: int) -> int:
        n = len(self.docs)
        if n == 0:
            return self.shard + position * self.num_shards
        per_shard = n // self.num_shards
        epoch, offset = divmod(position, per_shard)
        # The n % num_shards places no shard reads move on each epoch, so none is left out for good.
        return self._shuffled(epoch, (self.shard + offset * self.num_shards + epoch * (n % self.num_shards)) % n)

    def _shuffled(self, epoch: int, j: int) -> int:
        """The document at place j of epoch `epoch`'s order (see the module docstring)."""
        n = len(self.docs)
        full = n // SHUFFLE_BLOCK
        if self._blocks is None or self._blocks[0] != epoch:
            order = list(range(full))
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
            self._blocks = (epoch, order)
        k, within = divmod(j, SHUFFLE_BLOCK)
        block = self._blocks[1][k] if k < full else full
        if self._perm is None or self._perm[0] != (epoch, block):
            order = list(range(min(SHUFFLE_BLOCK, n - block * SHUFFLE_BLOCK)))
            random.Random(f"{self.seed}:{epoch}:{block}").shuffle(order)
            self._perm = ((epoch, block), order)
        return block * SHUFFLE_BLOCK + self._perm[1][within]

    def _read_chunk(self) -> None:
        turns = [t for i in range(CHUNK) for t in self.docs.document(self._doc_index(self.position + i))]
        self.position += CHUNK
        enc_p = self.tok.encode_batch([p for p, _ in turns], add_special_tokens=False)
        enc_a = self.tok.encode_batch([a for _, a in turns], add_special_tokens=False)
        before = len(self.carry_ids)
        for p, a in zip(enc_p, enc_a):
            self.carry_ids += p.ids + a.ids + [self.eos_id]
            self.carry_mask += [False] * len(p.ids) + [True] * (len(a.ids) + 1)
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
