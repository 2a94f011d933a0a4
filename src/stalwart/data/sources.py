"""Where a run's documents and tokenizer come from, shared by the training loop and the
supervisor (which prepares the tokenizer once, before any group starts)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stalwart.data.loader import Documents, TaskDocuments, TextDocuments
from stalwart.data.tokenizer import TOKENIZER_FILE, load_tokenizer, save_tokenizer, train_tokenizer

if TYPE_CHECKING:  # config.py imports data.tasks: take its section as a plain value here
    from stalwart.config import DataConfig


def documents(data: DataConfig, split: str) -> Documents:
    """The documents of one split: a generated task, or the user's files (read, and so
    checked, now)."""
    if data.task == "files":
        return TextDocuments(data.files, split)
    return TaskDocuments(data.task, split, data.seed, data.min_digits, data.max_digits)


def prepare_tokenizer(data: DataConfig, directory: Path, *, reuse: bool, docs: Documents, vocab_size: int,
                      max_length: int):
    """The run's tokenizer: the one already in `directory` when `reuse` (a resumed run),
    else trained on the first documents and saved there."""
    if reuse and (directory / TOKENIZER_FILE).exists():
        return load_tokenizer(directory)
    n = min(data.tokenizer_documents, len(docs) or data.tokenizer_documents)
    tok = train_tokenizer(("".join(docs.document(i)) for i in range(n)), vocab_size)
    save_tokenizer(tok, directory, model_max_length=max_length)
    return tok
