"""Embedded tasks, the resumable loader, and the typed run configuration."""

import re

import pytest
import torch

from stalwart.config import RunConfig, apply_overrides
from stalwart.data.loader import PackedLoader, TaskDocuments, TextDocuments
from stalwart.data.tasks import extract_answer, is_correct, make_problem
from stalwart.data.tokenizer import train_tokenizer
from stalwart.errors import ConfigError, UserError
from stalwart.model import IGNORE_INDEX
from stalwart.recipes import RECIPES, recipe


def check_addition(text: str) -> None:
    """Every column step is true arithmetic and the answer is the sum."""
    a, b = map(int, re.match(r"(\d+)\+(\d+)=", text).groups())
    for x, y, c, s in re.findall(r"(\d)\+(\d)\+(\d)=(\d\d)", text):
        assert int(x) + int(y) + int(c) == int(s)
    assert extract_answer(text) == str(a + b)


def check_multiplication(text: str) -> None:
    a, b = map(int, re.match(r"(\d+)\*(\d+)=", text).groups())
    for left, op, right, result in re.findall(r"(\d+)([*+])(\d+)=(\d+)", text.split("=", 1)[1]):
        assert (int(left) * int(right) if op == "*" else int(left) + int(right)) == int(result)
    assert extract_answer(text) == str(a * b)


@pytest.mark.parametrize("task, check, digits", [("addition", check_addition, (1, 4)),
                                                  ("multiplication", check_multiplication, (1, 3))])
def test_worked_solutions_are_correct_and_deterministic(task, check, digits):
    for i in range(300):
        p = make_problem(task, "train", i, 0, *digits)
        check(p.text)
        assert p == make_problem(task, "train", i, 0, *digits)


@pytest.mark.parametrize("task", ["addition", "multiplication"])
def test_train_and_eval_splits_are_disjoint(task):
    train = {make_problem(task, "train", i, 0, 1, 2).prompt for i in range(20000)}
    held_out = {make_problem(task, "eval", i, 0, 1, 2).prompt for i in range(300)}
    assert held_out and not train & held_out


def test_exact_match_scores_the_final_answer_only():
    p = make_problem("addition", "eval", 0, 0, 3, 3)
    assert is_correct(p, p.solution)
    assert is_correct(p, "some other steps," + " so " + p.answer)
    assert not is_correct(p, p.solution[:-1])
    assert not is_correct(p, "no answer here")


def test_unknown_task_and_bad_digits_are_config_errors():
    with pytest.raises(ConfigError, match="unknown task"):
        make_problem("division", "train", 0, 0, 1, 2)
    with pytest.raises(ConfigError, match="min_digits"):
        make_problem("addition", "train", 0, 0, 3, 2)


@pytest.fixture(scope="module")
def tokenizer():
    docs = TaskDocuments("addition", "train", 0, 3, 3)
    return train_tokenizer(("".join(docs.document(i)) for i in range(300)), 300)


def test_loader_resumes_from_its_state_with_identical_batches(tokenizer):
    docs = TaskDocuments("addition", "train", 0, 3, 3)
    a = PackedLoader(docs, tokenizer, seq_len=32, batch_size=3)
    for _ in range(5):
        a.next_batch()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in a.state_dict().items()}
    expected = [a.next_batch() for _ in range(4)]
    b = PackedLoader(docs, tokenizer, seq_len=32, batch_size=3)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expected, [b.next_batch() for _ in range(4)]):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_loader_masks_prompts_and_shifts_labels(tokenizer):
    x, y = PackedLoader(TaskDocuments("addition", "train", 0, 3, 3), tokenizer, seq_len=64, batch_size=2).next_batch()
    assert x.shape == y.shape == (2, 64)
    trained = y != IGNORE_INDEX
    assert trained.any() and (~trained).any()  # prompts are not trained on
    assert torch.equal(y[:, :-1][trained[:, :-1]], x[:, 1:][trained[:, :-1]])


def test_shards_see_disjoint_documents(tokenizer, tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(f'{{"text": "doc {i}"}}\n' for i in range(200)))
    docs = TextDocuments([str(tmp_path / "d.jsonl")], "train")
    seen = []
    for shard in range(2):
        loader = PackedLoader(docs, tokenizer, seq_len=8, batch_size=1, shard=shard, num_shards=2)
        seen.append({loader._doc_index(p) for p in range(len(docs) // 2)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == len(docs) - len(docs) % 2
    task = [TaskDocuments("addition", "train", 0, 3, 3)] * 2
    a = PackedLoader(task[0], tokenizer, seq_len=8, batch_size=1, shard=0, num_shards=2)
    b = PackedLoader(task[1], tokenizer, seq_len=8, batch_size=1, shard=1, num_shards=2)
    assert not {a._doc_index(p) for p in range(100)} & {b._doc_index(p) for p in range(100)}


def test_bad_data_files_are_user_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        TextDocuments([str(tmp_path / "bad.jsonl")], "train")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="cannot read data file"):
        TextDocuments([str(tmp_path / "binary.txt")], "train")
    with pytest.raises(UserError, match="cannot read data file"):
        TextDocuments([str(tmp_path / "missing.txt")], "train")


def test_every_recipe_is_a_valid_config_that_round_trips_through_json():
    for name in RECIPES:
        cfg = recipe(name)
        assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_are_typed_and_validated():
    cfg = apply_overrides(recipe("smoke"), {"train.steps": "7", "model.q_lora_rank": "none",
                                            "data.task": "files", "data.files": "a.txt,b.txt",
                                            "train.compile": "false"})
    assert cfg.train.steps == 7 and cfg.model.q_lora_rank is None and cfg.data.files == ("a.txt", "b.txt")
    for bad, words in [({"train.nope": "1"}, "unknown config key train.nope"),
                       ({"nosection.x": "1"}, "unknown config key nosection.x"),
                       ({"train.compile": "maybe"}, "expects bool"),
                       ({"eval.every": "-1"}, "eval.every must be >= 0")]:
        with pytest.raises(ConfigError, match=words):
            apply_overrides(recipe("smoke"), bad)
