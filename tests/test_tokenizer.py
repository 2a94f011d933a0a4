"""The tokenizer round-trips any text, splits digits, is deterministic and loads in transformers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stalwart.data.tokenizer import (
    MIN_VOCAB_SIZE,
    SPECIAL_TOKENS,
    decode,
    default_corpus,
    encode,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from stalwart.errors import ConfigError, ModelFileError

VOCAB_SIZE = 512


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(default_corpus(), VOCAB_SIZE)


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    save_tokenizer(tok, directory)
    return directory


ROUND_TRIP_TEXTS = [
    "",
    " ",
    "hello world",
    "  leading and trailing spaces  ",
    "123+456=579\n12*34=408",
    "héllo wörld, ça va? ñ",
    "日本語のテキスト 中文 한국어",
    "emoji 😀👍🏽 👨‍👩‍👧 flags 🇫🇷",
    "control \x00\x01\x02\x1b[0m\x7f bytes\t\r\n",
    "zero\u200bwidth \ufeff bom \u00ad soft",
    "\U0010ffff last code point",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_of_any_text_is_exact(tok, text):
    assert decode(tok, encode(tok, text)) == text


def test_every_digit_is_its_own_token(tok):
    ids = encode(tok, "12345")
    assert len(ids) == 5
    assert [decode(tok, [i]) for i in ids] == list("12345")
    # Even digits the corpus puts side by side are never merged.
    ids = encode(tok, "579=123+456")
    assert [decode(tok, [i]) for i in ids] == list("579=123+456")


def test_special_tokens_have_ids_0_1_2_and_are_skipped_on_decode(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    ids = encode(tok, "hi")
    assert encode(tok, "hi") == ids  # no bos/eos added
    assert decode(tok, [0, *ids, 1, 2, 2]) == "hi"


def test_same_corpus_gives_byte_identical_tokenizer_json(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    save_tokenizer(train_tokenizer(default_corpus(), VOCAB_SIZE), a)
    save_tokenizer(train_tokenizer(default_corpus(), VOCAB_SIZE), b)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_another_process_trains_the_same_tokenizer_json(tmp_path):
    # Rust's HashMap seeds differ per process, so determinism within one process is not enough.
    save_tokenizer(train_tokenizer(default_corpus(), VOCAB_SIZE), tmp_path / "here")
    script = (
        "import sys; from pathlib import Path; from stalwart.data.tokenizer import *; "
        f"save_tokenizer(train_tokenizer(default_corpus(), {VOCAB_SIZE}), Path(sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "there")], env=env, check=True)
    here, there = (tmp_path / d / "tokenizer.json" for d in ("here", "there"))
    assert here.read_bytes() == there.read_bytes()


def test_default_corpus_is_deterministic():
    assert default_corpus() == default_corpus()
    assert len(default_corpus()) >= 200


@pytest.mark.parametrize("vocab_size", [MIN_VOCAB_SIZE, 300, 2048])
def test_vocab_size_equals_the_request_exactly(vocab_size):
    tok = train_tokenizer(default_corpus(), vocab_size)
    assert tok.get_vocab_size() == vocab_size
    assert max(tok.get_vocab().values()) == vocab_size - 1  # ids are dense: 0..vocab_size-1


def test_vocab_size_below_minimum_raises_config_error_naming_it():
    with pytest.raises(ConfigError, match=str(MIN_VOCAB_SIZE)):
        train_tokenizer(default_corpus(), MIN_VOCAB_SIZE - 1)


def test_saved_tokenizer_loads_back_with_the_same_ids(tok, saved_dir):
    loaded = load_tokenizer(saved_dir)
    assert loaded.to_str() == tok.to_str()
    for text in ROUND_TRIP_TEXTS:
        assert encode(loaded, text) == encode(tok, text)


def test_save_leaves_no_temp_files(saved_dir):
    names = sorted(p.name for p in saved_dir.iterdir())
    assert names == ["special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]


def test_transformers_autotokenizer_gives_the_same_ids(tok, saved_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(saved_dir)
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    assert len(hf) == VOCAB_SIZE
    for text in ["123+456=579", "hello world", "émoji 😀 and\ttabs\n", "  spaced  out  "]:
        ids = encode(tok, text)
        assert hf.encode(text) == ids, text  # add_special_tokens defaults to True: still none
        assert hf.decode(ids, skip_special_tokens=True) == decode(tok, ids)


def test_missing_tokenizer_json_raises_model_file_error(tmp_path):
    with pytest.raises(ModelFileError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", ["{not json", '{"model": 42}', ""])
def test_corrupt_tokenizer_json_raises_one_line_model_file_error(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ModelFileError, match="tokenizer.json") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)
