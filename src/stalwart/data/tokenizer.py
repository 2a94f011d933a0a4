"""The BPE tokenizer: trained on the corpus with `tokenizers`, saved as a Hugging Face folder;
or any other `tokenizer.json` (a model folder's, `data.tokenizer`), used as it is.

Assumptions about the tokenizers stalwart trains:

- Ids 0, 1, 2 are `<|bos|>`, `<|eos|>`, `<|pad|>`; bos 0 and eos 1 are DeepSeek-V3's
  config defaults (`bos_token_id`, `eos_token_id`), so an exported config needs no remap.
- Every digit is its own token (as in Llama's and DeepSeek's tokenizers); otherwise "579"
  may be one token and "578" two, and arithmetic is needlessly hard to learn.
- Byte-level: the initial alphabet is all 256 bytes, so any string (emoji, control bytes,
  invalid-looking unicode) encodes and decodes back exactly; there is no unknown token.
- `get_vocab_size()` equals the requested size exactly, because the model's embedding
  table is sized from it; a small corpus is padded with reserved special tokens.
- Training is deterministic: the same texts give byte-identical `tokenizer.json`.
- The literal strings `<|bos|>`, `<|eos|>`, `<|pad|>` (and `<|reserved_N|>`) in a text
  encode as those special tokens, as transformers does; decoding drops them. Data that
  must carry them as plain text needs escaping first.

Another tokenizer keeps its own special tokens: which ids are bos, eos and pad comes from the
model's config, or where that names none, from the tokenizer's own config files
(`declared_special_ids`). The model config's ids are what generation stops at and what
separates packed documents.

Nothing is fetched from a hub; `transformers` can load the saved folder but is not needed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from stalwart.data.chat import CHAT_TEMPLATE
from stalwart.errors import ConfigError, ModelFileError
from stalwart.fsutil import atomic_write_bytes, atomic_write_json

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
# Every byte must be a token before any merge, plus the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with exactly `vocab_size` tokens on `texts`."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size {vocab_size} is too small: the minimum is {MIN_VOCAB_SIZE} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tok = Tokenizer(models.BPE())
    # Digits first so each digit becomes its own pre-token; ByteLevel then maps every byte
    # to a printable character and splits on GPT-2's regex (words, spaces, punctuation).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # first, so they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # A list, not a generator: the trainer then sees the texts in one fixed order.
    tok.train_from_iterator(list(texts), trainer=trainer)
    # A small corpus runs out of merges before vocab_size; pad with reserved tokens so the
    # embedding size the model derives from the tokenizer is the one that was asked for.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        reserved = [AddedToken(f"<|reserved_{i}|>", special=True) for i in range(missing)]
        tok.add_special_tokens(reserved)
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(name) == i, name
    return tok


def save_tokenizer(tok: Tokenizer, directory: Path, *, model_max_length: int = 4096, bos_id: int = BOS_ID,
                   eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> None:
    """Write `tokenizer.json` and the config files `transformers.AutoTokenizer` reads, naming
    the tokens at the model's bos, eos and pad ids, with the instruction format's chat
    template (data/chat.py), so that a serving engine's chat endpoint builds the prompts the
    model was fine-tuned on.

    `model_max_length` is only advisory for `transformers` (it warns past it); pass the
    model's `max_position_embeddings` when exporting.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    special_tokens_map = {f"{role}_token": tok.id_to_token(i)
                          for role, i in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id))
                          if tok.id_to_token(i) is not None}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_tokens_map,
        "model_max_length": model_max_length,
        # Our encode() adds no special tokens; the Hugging Face tokenizer must agree.
        "add_bos_token": False,
        "add_eos_token": False,
        # Cleaning up would drop spaces before punctuation and break exact round trips.
        "clean_up_tokenization_spaces": False,
        # What transformers' apply_chat_template and vLLM's / SGLang's chat endpoints render.
        "chat_template": CHAT_TEMPLATE,
    }
    atomic_write_bytes(directory / TOKENIZER_FILE, tok.to_str(pretty=True).encode())
    atomic_write_json(directory / "tokenizer_config.json", tokenizer_config)
    atomic_write_json(directory / "special_tokens_map.json", special_tokens_map)


def tokenizer_file(path: Path) -> Path:
    """`path` itself, or the tokenizer.json of the folder `path`."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer.json (`path` is the file or its folder); a missing or unreadable file
    is a ModelFileError."""
    path = tokenizer_file(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for bad JSON or schema
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFileError(f"{path}: corrupt tokenizer file ({reason})") from None


def declared_special_ids(path: Path, tok: Tokenizer) -> dict[str, int]:
    """The bos / eos / pad ids a tokenizer's folder declares ({"bos_token_id": 0, ...}): its
    tokenizer_config.json's, else its special_tokens_map.json's `bos_token`, `eos_token`,
    `pad_token` (a string, or an object with `content`), for those that are tokens of `tok`."""
    folder = tokenizer_file(path).parent
    found: dict[str, int] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            raw = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for role in ("bos", "eos", "pad"):
            token = raw.get(f"{role}_token") if isinstance(raw, dict) else None
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str) and tok.token_to_id(token) is not None:
                found.setdefault(f"{role}_token_id", tok.token_to_id(token))
    return found


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos (the caller frames sequences itself)."""
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    """Text of `ids`, dropping special tokens (bos, eos, pad, reserved)."""
    return tok.decode(list(ids), skip_special_tokens=True)


# A few dozen plain sentences so a tokenizer built before any training data exists still
# has merges for common English words, spaces and punctuation.
_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A model that does not give up keeps training through failures.",
    "What is the sum of these two numbers?",
    "The answer is the number after the equals sign.",
    "Check your work before you write the final answer.",
    "Every step of the calculation should be written down.",
    "She added the two numbers and wrote the result.",
    "He multiplied the first number by the second one.",
    "The machine stopped, and training resumed from the last checkpoint.",
    "Let us think step by step.",
    "First, add the ones. Then carry the ten.",
    "The result is correct.",
    "The result is wrong; try again.",
    "Question: how many apples are left?",
    "Answer: there are seven apples left.",
    "There were twelve birds on the wire, and five flew away.",
    "The train leaves at nine and arrives at noon.",
    "Water boils at one hundred degrees Celsius.",
    "A week has seven days, and a year has twelve months.",
    "Reading is the best way to learn new words.",
    "The cat sat on the mat and looked out of the window.",
    "Please write the answer as a single number.",
    "If you have three boxes with four pens each, you have twelve pens.",
    "The difference between ten and four is six.",
    "Half of twenty is ten.",
    "The teacher asked the class to solve the problem.",
    "It was a cold morning, but the sun came out later.",
    "We measure time in seconds, minutes and hours.",
    "The library opens at eight in the morning.",
    "Numbers can be even or odd.",
    "The product of two even numbers is even.",
    "A prime number has exactly two divisors.",
    "The sum of the angles of a triangle is one hundred and eighty degrees.",
    "Good data makes a good model.",
    "The quick test passed, and the slow test passed too.",
    "Is this statement true or false?",
    "Yes, that is true.",
    "No, that is false.",
    "Thank you for your help!",
    "Hello, world!",
)


def default_corpus() -> list[str]:
    """A small deterministic corpus: seeded arithmetic lines plus plain English sentences."""
    rng = random.Random(0)  # fixed seed: the default tokenizer must be the same everywhere
    lines = list(_SENTENCES)
    for _ in range(120):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"{a}+{b}={a + b}")
    for _ in range(80):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lo, hi = min(a, b), max(a, b)
        lines.append(f"{hi}-{lo}={hi - lo}")
    for _ in range(80):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"{a}*{b}={a * b}")
    return lines
