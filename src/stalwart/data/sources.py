"""Where a run's documents and tokenizer come from, shared by the training loop and the
supervisor (which prepares the tokenizer once, before any group starts)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from stalwart.data.loader import Documents, FileDocuments, TaskDocuments, text_of
from stalwart.data.tokenizer import (SPECIAL_TOKENS, TOKENIZER_FILE, declared_special_ids, load_tokenizer,
                                     save_tokenizer, train_tokenizer)
from stalwart.errors import ConfigError

if TYPE_CHECKING:  # config.py imports data.tasks: take its section as a plain value here
    from stalwart.config import DataConfig, RunConfig


def documents(data: DataConfig, split: str) -> Documents:
    """The documents of one split: a generated task, or the user's files (opened and indexed
    once for both splits while they are unchanged, data/files.py; their first records
    checked now)."""
    if data.task == "files":
        return FileDocuments(data.files, split, format=data.format, field=data.record_field)
    return TaskDocuments(data.task, split, data.seed, data.min_digits, data.max_digits)


def prepare_tokenizer(cfg: RunConfig, directory: Path, *, reuse: bool, docs: Documents | None = None):
    """The run's tokenizer, saved in `directory`: the one already there when `reuse` (a
    resumed run), else `data.tokenizer`, else one trained on the first documents (`docs`,
    by default the train split's, opened only then)."""
    if reuse and (directory / TOKENIZER_FILE).exists():
        return load_tokenizer(directory)
    data, model = cfg.data, cfg.model
    if data.tokenizer:
        tok = load_tokenizer(data.tokenizer)
    else:
        docs = documents(data, "train") if docs is None else docs
        n = min(data.tokenizer_documents, len(docs) or data.tokenizer_documents)
        tok = train_tokenizer((text_of(docs.document(i)) for i in range(n)), model.vocab_size)
    save_tokenizer(tok, directory, model_max_length=model.max_position_embeddings, bos_id=model.bos_token_id,
                   eos_id=model.eos_token_id, pad_id=model.pad_token_id)
    return tok


def with_tokenizer(cfg: RunConfig, given: set[str]) -> RunConfig:
    """`cfg` with `data.tokenizer`'s special ids (those its own config files declare) as the
    model's bos / eos / pad ids, except the ones `given` on the command line; a tokenizer
    larger than the model's vocabulary, or one with no known eos, is refused in one line."""
    if not cfg.data.tokenizer:
        return cfg
    tok, where = load_tokenizer(cfg.data.tokenizer), cfg.data.tokenizer
    if tok.get_vocab_size() > cfg.model.vocab_size:
        raise ConfigError(f"data.tokenizer {where} has {tok.get_vocab_size()} tokens but model.vocab_size is "
                          f"{cfg.model.vocab_size}: set --model.vocab_size {tok.get_vocab_size()} (or more)")
    # A model folder's own ids (model.from) were read with its config; config.json decides.
    ids = {} if cfg.model_from == where else \
        {k: v for k, v in declared_special_ids(where, tok).items() if f"model.{k}" not in given}
    model = cfg.model.replace(**ids)
    if "eos_token_id" not in ids and cfg.model_from != where and "model.eos_token_id" not in given and \
            tok.id_to_token(model.eos_token_id) != SPECIAL_TOKENS[1]:
        raise ConfigError(f"data.tokenizer {where} declares no eos token (no tokenizer_config.json beside it names "
                          "one): set --model.eos_token_id")
    return dataclasses.replace(cfg, model=model)
