"""The user's data files, read as a stream: records are addressed by index and read a page
at a time, so data larger than memory trains and every rank opens the same files without
reading them whole.

Formats, by what a path is:

- `.txt`: one record per paragraph (lines separated by blank lines);
- `.jsonl`: one JSON object per non-blank line;
- `.parquet`: one record per row (pyarrow; a row group is the unit read);
- a folder written by `datasets`' `save_to_disk` (state.json and .arrow files; a
  DatasetDict's `train` split), memory-mapped with pyarrow: the `datasets` package is not
  needed to read it;
- any other folder: every .txt, .jsonl, .parquet and .arrow file under it, in path order
  (a dataset repository's layout, data/train-00000-of-00004.parquet ...), except those of
  another split (a test, validation, eval or dev folder or file-name prefix) and README,
  LICENSE and requirements files.

What is held in memory: 24 bytes per record of a text file (its byte offsets and line
number), the row groups of the one parquet file being read (`Corpus.release`), the Arrow
files' maps. A corpus is opened and indexed once per process and shared by the train and
eval splits; it is opened again when a file's size or modification time changes.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stalwart.errors import UserError

PAGE = 1024  # records decoded together
MAX_RECORD_BYTES = 64 << 20  # a longer line or paragraph is a file that was not split into documents
SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install 'stalwart[data]' (or pyarrow)") from None
    return pyarrow


class RecordFile:
    """One file's records: `len()` of them, `page(p, columns)` the records PAGE*p ... as
    Python values (a table's: those columns only), `where(i)` the record's place for an
    error message ("a.jsonl:12"), `release()` what it holds beyond its index."""

    path: Path
    columns: dict[str, str] | None = None  # a table's column names and types (None: free-form records)

    def __len__(self) -> int: ...
    def page(self, p: int, columns: tuple[str, ...] = ()) -> list[Any]: ...
    def where(self, i: int) -> str: ...

    def release(self) -> None:
        pass


def _whole_lines(path: Path, block: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of `path` in blocks of about `block` bytes that end at a line end
    (a line longer than a block comes whole, in one)."""
    offset, pending = 0, []  # the chunks since the last newline
    with open(path, "rb") as f:
        while chunk := f.read(block):
            cut = chunk.rfind(b"\n") + 1
            if not cut:
                pending.append(chunk)
                continue
            data = b"".join(pending) + chunk[:cut]
            yield offset, data
            offset, pending = offset + len(data), [chunk[cut:]]
    if any(pending):
        yield offset, b"".join(pending) + b"\n"  # a last line without a newline


def _non_blank_lines(path: Path, block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, end, line number) of every line of `path` with a non-whitespace byte; ends
    exclude the newline. Read in blocks, so the file is never held whole."""
    starts, ends, numbers, line = [], [], [], 0
    for offset, data in _whole_lines(path, block):
        buf = np.frombuffer(data, dtype=np.uint8)
        line_ends = np.flatnonzero(buf == 10)
        line_starts = np.concatenate(([0], line_ends[:-1] + 1))
        keep = np.logical_or.reduceat(~_WHITESPACE[buf], line_starts)  # each line and its newline
        starts.append(line_starts[keep] + offset)
        ends.append(line_ends[keep] + offset)
        numbers.append(np.flatnonzero(keep) + line + 1)
        line += len(line_ends)
    return tuple(np.concatenate(parts or [np.zeros(0)]).astype(np.int64) for parts in (starts, ends, numbers))


class _TextLines(RecordFile):
    """.jsonl (a record per non-blank line, parsed as JSON) or .txt (a record per paragraph)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            starts, ends, numbers = _non_blank_lines(path)
        except OSError as e:
            raise UserError(f"cannot read data file {path}: {e.strerror or e}") from None
        if path.suffix == ".txt":  # a paragraph: consecutive non-blank lines
            first = np.concatenate(([True], np.diff(numbers) > 1)) if len(numbers) else np.zeros(0, bool)
            last = np.concatenate((first[1:], [True])) if len(numbers) else first
            starts, ends, numbers = starts[first], ends[last], numbers[first]
        self.starts, self.ends, self.numbers = starts, ends, numbers
        sizes = ends - starts
        if len(sizes) and sizes.max() > MAX_RECORD_BYTES:
            big = int(sizes.argmax())
            raise UserError(f"{self.where(big)}: a record of {sizes[big] / 2**20:.0f} MiB, above the "
                            f"{MAX_RECORD_BYTES >> 20} MiB a document may have (blank lines separate .txt documents)")

    def __len__(self) -> int:
        return len(self.starts)

    def where(self, i: int) -> str:
        return f"{self.path}:{int(self.numbers[i])}"

    def page(self, p: int, columns: tuple[str, ...] = ()) -> list[Any]:
        lo, hi = p * PAGE, min((p + 1) * PAGE, len(self))
        with open(self.path, "rb") as f:
            f.seek(int(self.starts[lo]))
            raw = f.read(int(self.ends[hi - 1] - self.starts[lo]))
        base = int(self.starts[lo])
        out = []
        for i in range(lo, hi):
            piece = raw[int(self.starts[i]) - base:int(self.ends[i]) - base]
            try:
                text = piece.decode("utf-8").removeprefix("\ufeff").strip().replace("\r\n", "\n")
            except UnicodeDecodeError:
                raise UserError(f"{self.where(i)}: not UTF-8 text") from None
            if self.path.suffix == ".jsonl":
                try:
                    text = json.loads(text)
                except json.JSONDecodeError:
                    raise UserError(f"{self.where(i)}: not a JSON object") from None
            out.append(text)
        return out


class _Table(RecordFile):
    """A file of rows with named columns (parquet, Arrow): a record is a row's dict."""

    def where(self, i: int) -> str:
        return f"{self.path} row {i}"


class _Parquet(_Table):
    def __init__(self, path: Path) -> None:
        pa = _pyarrow(path)
        self.path = path
        try:
            self.file = pa.parquet.ParquetFile(path)
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"cannot read data file {path}: {e}") from None
        meta = self.file.metadata
        self.columns = {f.name: str(f.type) for f in self.file.schema_arrow}
        self.bounds = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._groups: OrderedDict[tuple[int, tuple[str, ...]], Any] = OrderedDict()

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def _group(self, g: int, columns: tuple[str, ...]):
        if (g, columns) not in self._groups:
            self._groups[(g, columns)] = self.file.read_row_group(g, columns=list(columns))
            while len(self._groups) > 2:
                self._groups.popitem(last=False)
        return self._groups[(g, columns)]

    def release(self) -> None:
        self._groups.clear()

    def page(self, p: int, columns: tuple[str, ...] = ()) -> list[Any]:
        lo, hi = p * PAGE, min((p + 1) * PAGE, len(self))
        out: list[Any] = []
        while lo < hi:
            g = bisect.bisect_right(self.bounds, lo) - 1
            first, stop = int(self.bounds[g]), min(hi, int(self.bounds[g + 1]))
            out += self._group(g, columns).slice(lo - first, stop - lo).to_pylist()
            lo = stop
        return out


class _Arrow(_Table):
    """An Arrow IPC stream file as `datasets` writes it, memory-mapped."""

    def __init__(self, path: Path) -> None:
        pa = _pyarrow(path)
        self.path = path
        try:
            self.table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
        except (OSError, pa.ArrowException) as e:
            raise UserError(f"cannot read data file {path}: {e}") from None
        self.columns = {f.name: str(f.type) for f in self.table.schema}

    def __len__(self) -> int:
        return self.table.num_rows

    def page(self, p: int, columns: tuple[str, ...] = ()) -> list[Any]:
        return self.table.select(list(columns)).slice(p * PAGE, PAGE).to_pylist()


def _saved_dataset(folder: Path) -> list[Path]:
    """The .arrow files of a `save_to_disk` folder (a DatasetDict: of its train split)."""
    if (folder / "dataset_dict.json").is_file():
        if not (folder / "train" / "state.json").is_file():
            raise UserError(f"{folder} is a saved DatasetDict without a train split")
        folder = folder / "train"
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return [folder / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{folder}/state.json is not a saved dataset's state") from None


_OTHER_SPLIT = re.compile(r"^(test|testing|validation|valid|val|eval|dev)([-_.]|$)", re.I)
_NOT_DATA = re.compile(r"^(readme|license|licence|requirements|changelog)\b", re.I)


def _other_split(relative: Path) -> bool:
    """Whether a file found in a data folder belongs to another split than train, or is no data."""
    return any(_OTHER_SPLIT.match(part) for part in relative.parts) or bool(_NOT_DATA.match(relative.name))


def data_files(paths: Sequence[str]) -> list[Path]:
    """Every file the paths name, folders expanded (see the module docstring)."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            out += _saved_dataset(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()
                           and not _other_split(p.relative_to(path)))
            if not found:
                raise UserError(f"data folder {path} has no {', '.join(SUFFIXES)} files")
            out += found
        elif not path.is_file():
            raise UserError(f"cannot read data file {path}: No such file")
        else:
            out.append(path)
    return out


def open_record_file(path: Path) -> RecordFile:
    if path.suffix in (".txt", ".jsonl"):
        return _TextLines(path)
    if path.suffix == ".parquet":
        return _Parquet(path)
    if path.suffix == ".arrow":
        return _Arrow(path)
    raise UserError(f"data file {path}: unknown format (expected {', '.join(SUFFIXES)})")


class Corpus:
    """The records of a list of paths, in order: each file opened and indexed once."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.files = [open_record_file(p) for p in data_files(paths)]
        self.bounds = [0]
        for f in self.files:
            self.bounds.append(self.bounds[-1] + len(f))
        self._reading: RecordFile | None = None

    def __len__(self) -> int:
        return self.bounds[-1]

    def locate(self, g: int) -> tuple[RecordFile, int]:
        """The file of record g and its index there; the file read before gives back its row groups."""
        n = bisect.bisect_right(self.bounds, g) - 1
        f = self.files[n]
        if self._reading is not None and self._reading is not f:
            self._reading.release()
        self._reading = f
        return f, g - self.bounds[n]


def _identity(paths: Sequence[str]) -> tuple:
    """What names a corpus: each data file's resolved path, size and modification time."""
    out = []
    for f in data_files(paths):
        stat = f.stat()
        out.append((str(f.resolve()), stat.st_size, stat.st_mtime_ns))
    return tuple(out)


@functools.lru_cache(maxsize=2)
def _corpus(identity: tuple, paths: tuple[str, ...]) -> Corpus:
    return Corpus(paths)


def open_corpus(paths: Sequence[str]) -> Corpus:
    """The corpus of `paths`, shared by every caller while its files are unchanged."""
    return _corpus(_identity(paths), tuple(paths))
