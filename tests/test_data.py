"""Embedded tasks, the resumable loader, and the typed run configuration."""

import json
import re

import pytest
import torch

from stalwart.config import RunConfig, apply_overrides
from stalwart.data.loader import FileDocuments, PackedLoader, TaskDocuments, text_of
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
    return train_tokenizer((text_of(docs.document(i)) for i in range(300)), 300)


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
    docs = FileDocuments([str(tmp_path / "d.jsonl")], "train")
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
        docs = FileDocuments([str(tmp_path / "bad.jsonl")], "train")
        docs.document(1)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="binary.txt:1: not UTF-8"):
        FileDocuments([str(tmp_path / "binary.txt")], "train")
    with pytest.raises(UserError, match="cannot read data file"):
        FileDocuments([str(tmp_path / "missing.txt")], "train")


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


# User files: every format read as a stream, the chat format, the epoch order.

def _records(n: int) -> list[str]:
    return [f"record {i} ünïcode ✓" for i in range(n)]


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    """The same 300 records as .jsonl, as parquet with row groups of 37 rows, as a saved
    DatasetDict (datasets' own save_to_disk), and as a dataset repository's folder: two
    train parquet files, and a test split, a validation folder and a README left out."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, texts = tmp_path_factory.mktemp("data"), _records(300)
    (root / "d.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"text": texts, "id": list(range(300))}), root / "d.parquet", row_group_size=37)
    (root / "repo" / "data").mkdir(parents=True)
    for part, rows in enumerate((texts[:120], texts[120:])):
        pq.write_table(pa.table({"text": rows}), root / "repo" / "data" / f"train-{part:05d}-of-00002.parquet")
    pq.write_table(pa.table({"text": ["a test row"]}), root / "repo" / "data" / "test-00000-of-00001.parquet")
    (root / "repo" / "validation").mkdir()
    (root / "repo" / "validation" / "more.jsonl").write_text('{"text": "a validation row"}\n')
    (root / "repo" / "README.txt").write_text("This dataset card is no data.")
    ds = datasets.Dataset.from_dict({"text": texts})
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(root / "saved"))
    return root, texts


@pytest.mark.parametrize("name", ["d.jsonl", "d.parquet", "saved", "repo"])
def test_every_file_format_gives_the_same_documents_and_held_out_split(data_folder, name):
    root, texts = data_folder
    train, held_out = (FileDocuments([str(root / name)], split) for split in ("train", "eval"))
    assert len(train) + len(held_out) == 300 and len(held_out) == 300 // 64
    assert [train.document(i) for i in range(len(train))] == \
        [(("", t),) for i, t in enumerate(texts) if i % 64 != 63]
    assert [held_out.document(i) for i in range(len(held_out))] == [(("", texts[i]),) for i in (63, 127, 191, 255)]


def test_a_missing_field_is_one_line_naming_the_file_and_what_it_has(data_folder, tmp_path):
    root, _ = data_folder
    with pytest.raises(UserError, match=r"data.field 'body' is not a column of .*d.parquet \(columns: text, id\)"):
        FileDocuments([str(root / "d.parquet")], "train", field="body")
    with pytest.raises(UserError, match=r"d.jsonl:1: expected a record with a string 'body' field"):
        FileDocuments([str(root / "d.jsonl")], "train", field="body")
    with pytest.raises(UserError, match=r"data.field 'id' of .*d.parquet holds int64, not text"):
        FileDocuments([str(root / "d.parquet")], "train", field="id")
    (tmp_path / "notes.txt").write_text("a paragraph")
    with pytest.raises(UserError, match="data.format chat reads .jsonl, .parquet or saved datasets, not .txt"):
        FileDocuments([str(tmp_path / "notes.txt")], "train", format="chat", field="messages")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="data folder .*empty has no"):
        FileDocuments([str(tmp_path / "empty")], "train")


def test_text_files_lose_their_byte_order_mark_and_carriage_returns(tmp_path):
    (tmp_path / "w.txt").write_bytes(b"\xef\xbb\xbfone\r\nline\r\n\r\ntwo")
    (tmp_path / "w.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "x"}\r\n{"text": "y"}')
    assert [FileDocuments([str(tmp_path / "w.txt")], "train").document(i) for i in range(2)] == \
        [(("", "one\nline"),), (("", "two"),)]
    assert FileDocuments([str(tmp_path / "w.jsonl")], "train").document(0) == (("", "x"),)


def test_both_splits_share_one_index_until_a_file_changes(tmp_path, monkeypatch):
    import stalwart.data.files as files

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"v1 {i}"}) + "\n" for i in range(100)))
    train, held_out = (FileDocuments([str(path)], split) for split in ("train", "eval"))
    assert train.corpus is held_out.corpus and held_out.document(0) == (("", "v1 63"),)
    path.write_text("".join(json.dumps({"text": f"version 2: {i}"}) + "\n" for i in range(100)))
    assert FileDocuments([str(path)], "train").document(0) == (("", "version 2: 0"),)
    monkeypatch.setattr(files, "MAX_RECORD_BYTES", 8)
    path.write_text(json.dumps({"text": "a long record"}) + "\n")
    with pytest.raises(UserError, match=r"d.jsonl:1: a record of 0 MiB, above the 0 MiB a document may have"):
        FileDocuments([str(path)], "train")


def test_a_large_jsonl_is_read_a_page_at_a_time(tmp_path):
    """Opening a 40 MB file and reading 5,000 of its documents holds its line offsets and
    a few pages, never the file: the Python heap's peak stays under a quarter of its size."""
    import tracemalloc

    path, line = tmp_path / "big.jsonl", json.dumps({"text": "x" * 400}) + "\n"
    path.write_text(line * 100_000)
    size = path.stat().st_size
    tracemalloc.start()
    docs = FileDocuments([str(path)], "train")
    for i in range(0, len(docs), 20):
        assert docs.document(i) == (("", "x" * 400),)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(docs) == 100_000 - 100_000 // 64 and peak < size / 4, (peak, size)


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6"}]


def test_chat_records_train_on_the_answers_and_their_eos_only(tmp_path, tokenizer):
    from stalwart.data.chat import turns

    assert turns(CONVERSATION) == (("Be brief.\n\nUser: 2+2?\n\nAssistant: ", "4"),
                                   ("User: and 3+3?\n\nAssistant: ", "6"))
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": CONVERSATION}) + "\n" +
                                         json.dumps({"prompt": "1+1?", "completion": "2"}) + "\n")
    docs = FileDocuments([str(tmp_path / "chat.jsonl")], "train", format="chat", field="messages")
    assert docs.document(1) == (("User: 1+1?\n\nAssistant: ", "2"),)
    x, y = PackedLoader(docs, tokenizer, seq_len=400, batch_size=1).next_batch()
    trained = [int(t) for t in y[0] if t != IGNORE_INDEX]
    first = trained[:trained.index(1, trained.index(1) + 1) + 1]  # the first document's two answers, each + eos
    assert tokenizer.decode(first, skip_special_tokens=False) == "4<|eos|>6<|eos|>"
    for bad, words in (([{"role": "user", "content": "hi"}], "no assistant message"),
                       ([{"role": "robot", "content": "hi"}], "message 0 must be an object with a role"),
                       ([{"role": "assistant", "content": "hi"}], "must follow a user message")):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": bad}) + "\n")
        with pytest.raises(UserError, match=f"bad.jsonl:1: .*{words}"):
            FileDocuments([str(tmp_path / "bad.jsonl")], "train", format="chat", field="messages")


def test_each_epoch_reads_every_document_once_per_shard_in_a_new_order(tokenizer):
    """10,000 documents: blocks of 4,096 shuffled and shuffled within, the short block last."""

    class Numbered:
        def __len__(self):
            return 10_000

        def document(self, index):
            return (("", str(index)),)

    shards = [PackedLoader(Numbered(), tokenizer, seq_len=8, batch_size=1, seed=3, shard=s, num_shards=2)
              for s in range(2)]
    epochs = [[s._doc_index(e * 5000 + p) for s in shards for p in range(5000)] for e in range(2)]
    for order in epochs:
        assert sorted(order) == list(range(10_000))
    assert epochs[0] != epochs[1] and epochs[0][:10] != list(range(0, 20, 2))
    last = epochs[0][5000 - 904:5000]  # shard 0's part of the short block
    assert len(set(last)) == 904 and set(last) <= set(range(8192, 10_000))
    Numbered.__len__ = lambda self: 4097  # one place a round left over: another document each epoch
    shards = [PackedLoader(Numbered(), tokenizer, seq_len=8, batch_size=1, seed=3, shard=s, num_shards=2)
              for s in range(2)]
    epochs = [{s._doc_index(e * 2048 + p) for s in shards for p in range(2048)} for e in range(2)]
    assert all(len(order) == 4096 for order in epochs) and epochs[0] | epochs[1] == set(range(4097))


def test_loader_on_parquet_resumes_bit_exactly_on_every_shard(data_folder, tokenizer):
    root, _ = data_folder
    docs = FileDocuments([str(root / "d.parquet")], "train")
    for shard in range(2):
        a = PackedLoader(docs, tokenizer, seq_len=48, batch_size=2, shard=shard, num_shards=2)
        for _ in range(30):  # past the end of the first epoch (148 documents a shard)
            a.next_batch()
        state = a.state_dict()
        expected = [a.next_batch() for _ in range(10)]
        b = PackedLoader(FileDocuments([str(root / "d.parquet")], "train"), tokenizer, seq_len=48, batch_size=2,
                         shard=shard, num_shards=2)
        b.load_state_dict(state)
        for (x1, y1), (x2, y2) in zip(expected, [b.next_batch() for _ in range(10)]):
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
