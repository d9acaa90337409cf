#!/usr/bin/env python3
"""Turn text into Parameter Golf shards: fineweb_{val,train}_NNNNNN.bin plus a SentencePiece model.

Long documents (--books [DIR], default ../shared/corpus next to the repository): a folder with
books_val.txt.xz and books_train.txt.xz (xz-compressed UTF-8, books separated by three newlines,
split by author). One book = one document. Val shards come from books_val, train shards from
books_train, each in file order: the corpus's own split is kept, nothing is shuffled. The files
are streamed (a batch of books in memory at a time); --max-val-books / --max-train-books keep
the first N books of a split. The summary gives books and tokens per split and the
tokens-per-book distribution (min/median/max).

Input documents otherwise (in this order, then shuffled with --seed):
  * a .jsonl file: one document per line, taken from its "text" field;
  * any other file (.txt, .md, ...): UTF-8 text split into documents at blank lines,
    so each paragraph is one document (use JSONL to keep longer documents whole);
  * a folder: every *.txt, *.md and *.jsonl below it, in sorted path order;
  * nothing (no --text): the built-in corpus, the documentation that ships with CPython
    (pydoc topics + standard-library docstrings), identical for a given Python build.

Tokenizer: --tokenizer MODEL is checked (bos_id 1, uint16 ids, a lone "▁" piece) and copied;
otherwise a BPE model of --vocab-size pieces is trained on the train documents only (the first
50M chars), with the challenge's SentencePiece settings (byte fallback, split digits, nmt_nfkc,
no dummy prefix, pad/bos/eos/unk = 0/1/2/3). Documents are held in memory.

Export semantics follow the challenge: the first documents are val, the rest train (with --books:
the val file's books, then the train file's); each document is stored as [bos_id] + encode(text)
with no EOS, packed back to back into shards of --shard-tokens tokens; a shard is flushed when
full and when the split changes.

Shard file: 256 little-endian int32 header (magic 20240520, version 1, token count N, zeros)
= 1024 bytes, then N little-endian uint16 tokens.

Written layout (default):
  OUT/fineweb_val_000000.bin ...   validation shards
  OUT/fineweb_train_000000.bin ... training shards
  OUT/fineweb_{V}_bpe.model        the tokenizer (--tokenizer-out moves it)
so the host runs with DATA_PATH=OUT TOKENIZER_PATH=OUT/fineweb_{V}_bpe.model.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import io
import json
import lzma
import os
import random
import re
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import sentencepiece as spm

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256  # 1024-byte header
MAX_SHARD_TOKENS = 2**31 - 1  # the challenge's writer refuses N >= 2**31
MAX_VOCAB = 2**16 - 1  # tokens are stored as uint16
BOS_ID = 1
SPACE_PIECE = "\u2581"  # "▁": the scorer needs it as a piece of its own
TEXT_SUFFIXES = (".txt", ".md", ".jsonl")
TOKENIZER_TRAIN_CHARS = 50_000_000  # cap on training text for the tokenizer (speed, memory)
ENCODE_BATCH_DOCS = 2048
ENCODE_BATCH_CHARS = 4_000_000  # a batch of books (~10): its ids as Python lists take ~100 MB at most
BOOKS_FILES = {"val": "books_val.txt.xz", "train": "books_train.txt.xz"}
BOOK_SEPARATOR = "\n\n\n"
BOOKS_DEFAULT = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"
READ_CHUNK_CHARS = 1 << 20


class DatasetError(ValueError):
    """Bad input: the message names the offending value and what would be valid."""


# -----------------------------------------------------------------------------
# Shard files


def write_shard(path: str | os.PathLike, tokens) -> None:
    """Write one shard (header + uint16 tokens) atomically."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DatasetError(f"shard tokens must be 1-D, got shape {tokens.shape}")
    if len(tokens) >= 2**31:
        raise DatasetError(f"shard of {len(tokens):,} tokens: the format holds fewer than 2**31")
    if tokens.dtype != np.uint16 and len(tokens) and (tokens.min() < 0 or tokens.max() > MAX_VOCAB):
        raise DatasetError(f"token ids must be in [0, {MAX_VOCAB}], got [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    write_atomic(path, header.tobytes(), tokens.astype("<u2", copy=False).tobytes())


def write_atomic(path: str | os.PathLike, *chunks: bytes) -> None:
    """Temp file in the same folder, fsync, os.replace: readers see the old file or the whole new one.
    A file replaced keeps its permission bits (an executable script stays executable). The tools' one copy
    (patch_host.py imports it); train_gpt.py has its own, the counted file standing alone."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """Read one shard with the host's checks (magic, version, exact file size)."""
    path = Path(path)
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if len(header) != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise DatasetError(f"{path}: not a shard (expected magic {SHARD_MAGIC}, version {SHARD_VERSION})")
    n = int(header[2])
    if path.stat().st_size != 4 * HEADER_INTS + 2 * n:
        raise DatasetError(f"{path}: size {path.stat().st_size} != 1024 + 2*{n}")
    return np.fromfile(path, dtype="<u2", count=n, offset=4 * HEADER_INTS)


def shard_paths(folder: str | os.PathLike, split: str) -> list[Path]:
    """The shards of one split, sorted, as the host globs them."""
    return sorted(Path(folder).glob(f"fineweb_{split}_*.bin"))


# -----------------------------------------------------------------------------
# Documents


def load_documents(paths) -> list[str]:
    """Documents from files and folders, in argument order and sorted order within a folder."""
    docs = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not files:
                raise DatasetError(f"--text {path}: folder has no {', '.join(TEXT_SUFFIXES)} files")
        elif path.is_file():
            files = [path]
        else:
            raise DatasetError(f"--text {path}: no such file or folder")
        for file in files:
            docs += _read_jsonl(file) if file.suffix == ".jsonl" else _read_paragraphs(file)
    if not docs:
        raise DatasetError(f"--text {' '.join(map(str, paths))}: no non-empty documents found")
    return docs


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_paragraphs(path: Path) -> list[str]:
    paragraphs = re.split(r"\n\s*\n", _read_text(path))
    return [p.strip() for p in paragraphs if p.strip()]


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DatasetError(f"{path}:{lineno}: expected an object with a string 'text' field, got {got}")
        if record["text"].strip():
            docs.append(record["text"])
    return docs


def books_files(folder: str | os.PathLike) -> dict[str, Path]:
    """{"val": .../books_val.txt.xz, "train": .../books_train.txt.xz}, or a one-line error."""
    folder = Path(folder)
    expected = (f"expected a folder holding {BOOKS_FILES['val']} and {BOOKS_FILES['train']} "
                "(xz-compressed UTF-8 text, books separated by three newlines)")
    if not folder.is_dir():
        raise DatasetError(f"--books {folder}: {'not a folder' if folder.exists() else 'no such folder'}; {expected}")
    missing = [name for name in BOOKS_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise DatasetError(f"--books {folder}: no {' and no '.join(missing)}; {expected}")
    return {split: folder / name for split, name in BOOKS_FILES.items()}


class BookFile:
    """The books of one .xz file, in file order, streamed: iterating yields one str per book.

    The text is split at every "\\n\\n\\n" (inside a book there are at most two newlines in a row);
    newlines around a book are dropped and empty pieces skipped. Newlines are read in universal
    mode ("\\r\\n" -> "\\n"). Memory: one read chunk plus the book being cut. `limit` stops after
    that many books; `fraction()` is the share of the compressed file read so far.
    """

    def __init__(self, path: str | os.PathLike, limit: int | None = None):
        self.path, self.limit = Path(path), limit
        self.size = max(self.path.stat().st_size, 1)
        self.read_bytes = 0  # compressed bytes read so far
        self.books = 0

    def fraction(self) -> float:
        return min(self.read_bytes / self.size, 1.0)

    def __iter__(self) -> Iterator[str]:
        self.books = self.read_bytes = 0
        try:
            with open(self.path, "rb") as raw, lzma.open(raw, "rt", encoding="utf-8") as text:
                rest = ""
                while self.limit is None or self.books < self.limit:
                    chunk = text.read(READ_CHUNK_CHARS)
                    self.read_bytes = raw.tell()
                    *books, rest = (rest + chunk).split(BOOK_SEPARATOR)
                    if not chunk:  # end of file: what is left is the last book
                        books.append(rest)
                    for book in books:
                        book = book.strip("\n")
                        if book and (self.limit is None or self.books < self.limit):
                            self.books += 1
                            yield book
                    if not chunk:
                        break
        except lzma.LZMAError as e:
            raise DatasetError(f"{self.path}: not a readable .xz file ({e})") from None
        except UnicodeDecodeError as e:
            raise DatasetError(f"{self.path}: not UTF-8 text ({e.reason})") from None
        if not self.books:
            raise DatasetError(f"{self.path}: no books found (expected UTF-8 text, books separated by three newlines)")


# Never import these (GUI, easter eggs with side effects) and skip test code.
_EXCLUDED_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "readline",
                     "__hello__", "__phello__"}
_TEST_PARTS = {"test", "tests", "idle_test"}


def builtin_corpus() -> list[str]:
    """CPython's own documentation: one doc per pydoc topic and one per stdlib module.

    Pure-Python modules are read with ast (no code runs); compiled modules (builtins, math,
    itertools, ...) are imported to reach their docstrings. Order is sorted, so a given
    Python build always yields the same documents.
    """
    from pydoc_data.topics import topics

    docs = [topics[name].strip() for name in sorted(topics)]
    docs += [_source_module_doc(name, path) for name, path in _stdlib_sources()]
    docs += [_compiled_module_doc(name) for name in _compiled_stdlib_modules()]
    return [doc for doc in docs if doc]


def _is_wanted_module(dotted: str) -> bool:
    parts = dotted.split(".")
    return (parts[0] in sys.stdlib_module_names and parts[0] not in _EXCLUDED_MODULES
            and not _TEST_PARTS.intersection(parts) and not parts[-1].startswith("test_"))


def _stdlib_sources() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and all(p.isidentifier() for p in parts) and _is_wanted_module(".".join(parts)):
            found.append((".".join(parts), path))
    return sorted(found)


def _source_module_doc(module: str, path: Path) -> str:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return ""
    sections = []

    def visit(node, qualname):
        doc = ast.get_docstring(node)
        if doc:
            is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            signature = f"({ast.unparse(node.args)})" if is_function else ""
            sections.append(f"{qualname}{signature}\n{doc}")
        for child in node.body:
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{qualname}.{child.name}")

    visit(tree, module)
    return "\n\n".join(sections)


def _compiled_stdlib_modules() -> list[str]:
    dynload = Path(sysconfig.get_paths()["platstdlib"]) / "lib-dynload"
    names = set(sys.builtin_module_names)
    names.update(p.name.split(".")[0] for p in dynload.glob("*.so"))
    # Leading underscore: private accelerators whose docs the public modules already carry.
    return sorted(n for n in names if not n.startswith("_") and _is_wanted_module(n) and not n.startswith("xx"))


def _compiled_module_doc(module: str) -> str:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated modules (nis, spwd, ...) warn on import
            mod = importlib.import_module(module)
    except ImportError:
        return ""
    sections = [f"{module}\n{inspect.cleandoc(mod.__doc__)}"] if mod.__doc__ else []

    def add(qualname, obj):
        if not isinstance(obj.__doc__, str) or not obj.__doc__.strip():
            return
        try:
            signature = str(inspect.signature(obj)) if callable(obj) and not inspect.isclass(obj) else ""
        except (TypeError, ValueError):
            signature = ""
        sections.append(f"{qualname}{signature}\n{inspect.cleandoc(obj.__doc__)}")

    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module:
            continue  # private, or re-exported from elsewhere
        add(f"{module}.{name}", obj)
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and callable(member):
                    add(f"{module}.{name}.{attr}", member)
    return "\n\n".join(sections)


# -----------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(docs, vocab_size: int = 1024, *, seed: int = 1337,
                    max_chars: int = TOKENIZER_TRAIN_CHARS) -> spm.SentencePieceProcessor:
    """Train a BPE SentencePiece model with the challenge's settings on (a prefix of) docs."""
    _check_vocab_size(vocab_size)
    sample, chars = [], 0
    for doc in docs:
        if chars >= max_chars:
            break
        sample.append(doc)
        chars += len(doc)
    if not sample:
        raise DatasetError("no documents to train the tokenizer on")
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()  # the trainer writes the .model here, not to a path
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sample), model_writer=model,
            model_type="bpe", vocab_size=vocab_size, character_coverage=0.999,
            byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
            add_dummy_prefix=False, hard_vocab_limit=False,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3,
            # Whole documents are sentences, as they are encoded; all of them, unshuffled.
            max_sentence_length=max(4192, max(len(d.encode()) for d in sample)),
            input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=min(2, os.cpu_count() or 1), minloglevel=2)
    except RuntimeError as e:
        raise DatasetError(f"--vocab-size {vocab_size}: sentencepiece refused it: {e}") from None
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    if sp.vocab_size() != vocab_size:
        raise DatasetError(f"--vocab-size {vocab_size}: the training text only supports "
                           f"{sp.vocab_size()} pieces; use a smaller vocab or more text")
    check_tokenizer(sp, f"trained tokenizer (vocab {vocab_size})")
    return sp


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """Load and check a .model file given with --tokenizer."""
    path = Path(path)
    if path.suffix != ".model":
        raise DatasetError(f"--tokenizer {path}: expected a SentencePiece .model file")
    if not path.is_file():
        raise DatasetError(f"--tokenizer {path}: no such file")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise DatasetError(f"--tokenizer {path}: not a readable SentencePiece model ({e})") from None
    check_tokenizer(sp, f"--tokenizer {path}")
    return sp


def check_tokenizer(sp: spm.SentencePieceProcessor, name: str) -> None:
    """What the shards and the host's scorer rely on."""
    if sp.bos_id() != BOS_ID:
        raise DatasetError(f"{name}: bos_id is {sp.bos_id()}, shards need bos_id {BOS_ID}")
    if sp.vocab_size() > MAX_VOCAB + 1:
        raise DatasetError(f"{name}: vocab size {sp.vocab_size()} does not fit uint16 tokens (max {MAX_VOCAB + 1})")
    if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
        raise DatasetError(f"{name}: has no '{SPACE_PIECE}' piece, which the scorer's byte tables need")


def _check_vocab_size(vocab_size: int) -> None:
    if not 260 < vocab_size <= MAX_VOCAB:
        raise DatasetError(f"--vocab-size {vocab_size}: must be in 261..{MAX_VOCAB} "
                           "(4 special + 256 byte pieces, uint16 tokens)")


# -----------------------------------------------------------------------------
# Dataset


class Progress:
    """A status line on stderr, redrawn at most 4x/s on a terminal (every 5 s into a log)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.interval = 0.25 if self.tty else 5.0
        self.last = time.monotonic()  # the first line after one interval: short steps print only their final line

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def status(self, message: str, final: bool = False) -> None:
        now = time.monotonic()
        if self.quiet or (not final and now - self.last < self.interval):
            return
        self.last = now
        end = "\n" if final or not self.tty else ""
        print(f"\r{message}\x1b[K" if self.tty else message, end=end, file=sys.stderr, flush=True)


class _ShardWriter:
    """Packs token arrays back to back into fixed-size shards written to a staging folder."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split = folder, split
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)
        self.fill = 0
        self.names: list[str] = []

    def add(self, tokens: np.ndarray) -> None:
        while len(tokens):
            take = min(len(tokens), len(self.buffer) - self.fill)
            self.buffer[self.fill:self.fill + take] = tokens[:take]
            self.fill += take
            tokens = tokens[take:]
            if self.fill == len(self.buffer):
                self.flush()

    def flush(self) -> None:
        if self.fill:
            name = f"fineweb_{self.split}_{len(self.names):06d}.bin"
            write_shard(self.folder / name, self.buffer[:self.fill])
            self.names.append(name)
            self.fill = 0


def build_dataset(out_dir, docs, *, tokenizer=None, vocab_size: int = 1024, tokenizer_out=None,
                  val_docs: int | None = None, val_frac: float = 0.1, shard_tokens: int = 10**8,
                  seed: int = 1337, max_docs: int | None = None, force: bool = False,
                  quiet: bool = False) -> dict:
    """Shuffle docs, split val/train, tokenize, and write shards + tokenizer. Returns a summary.

    tokenizer: path of a .model to use (copied to tokenizer_out); None trains one with
    vocab_size on the train docs. tokenizer_out defaults to OUT/fineweb_{V}_bpe.model.
    All shards are staged in a hidden folder inside OUT and moved in only when every one of
    them is written, so a failure leaves no partial shard (and, with force, the old ones).
    """
    started = time.monotonic()
    progress = Progress(quiet)
    out_dir = Path(out_dir)
    _check_build_args(shard_tokens, tokenizer, vocab_size)
    if max_docs is not None and max_docs < 2:
        raise DatasetError(f"--max-docs {max_docs}: must be at least 2 (one val and one train document)")
    old_shards = _check_out_dir(out_dir, force)

    # 1. Shuffle, cap and split by whole documents: val first, as in the challenge.
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    docs = [docs[i] for i in order[:max_docs]]
    if len(docs) < 2:
        raise DatasetError(f"the corpus has {len(docs)} document(s); need at least 2 (one val, one train)")
    n_val = val_docs if val_docs is not None else _val_count(val_frac, len(docs))
    if not 1 <= n_val < len(docs):
        raise DatasetError(f"--val-docs {n_val}: must be in 1..{len(docs) - 1} "
                           f"(the corpus has {len(docs)} documents, at least one must be train)")
    splits = {"val": docs[:n_val], "train": docs[n_val:]}
    progress.log(f"corpus: {len(docs):,} docs ({n_val:,} val), {sum(map(len, docs)):,} chars")

    # 2. Tokenizer: given, or trained on the train split only.
    tok = _prepare_tokenizer(out_dir, tokenizer, tokenizer_out, vocab_size, seed, force, progress,
                             splits["train"], f"{len(splits['train']):,} train docs")

    # 3. Encode and stage shards, then move them into place.
    written = _write_splits(out_dir, old_shards, tok, splits, shard_tokens, progress,
                            {split: dict(unit="docs", total=len(d)) for split, d in splits.items()})
    summary = {**_summary_head(out_dir, tok, seed),
               "docs": len(docs), "val_docs": len(splits["val"]), "train_docs": len(splits["train"]),
               **written, "seconds": round(time.monotonic() - started, 2)}
    _log_written(progress, out_dir, summary)
    return summary


def builtin_shards(out_dir, tokenizer_out, *, tokenizer=None, quiet: bool = True) -> tuple[Path, Path]:
    """The built-in corpus as shards in out_dir, its tokenizer at tokenizer_out (the given model copied, or a
    vocab-1024 BPE trained), as `make_dataset.py --out OUT --tokenizer-out PATH` writes them; built once and
    reused while OUT holds a val shard. For the demo and the benchmarks."""
    out_dir, tokenizer_out = Path(out_dir), Path(tokenizer_out)
    if not shard_paths(out_dir, "val"):
        build_dataset(out_dir, builtin_corpus(), tokenizer=tokenizer, tokenizer_out=tokenizer_out, force=True, quiet=quiet)
    return out_dir, tokenizer_out


def build_books_dataset(out_dir, books=BOOKS_DEFAULT, *, tokenizer=None, vocab_size: int = 1024,
                        tokenizer_out=None, max_val_books: int | None = None,
                        max_train_books: int | None = None, shard_tokens: int = 10**8,
                        seed: int = 1337, force: bool = False, quiet: bool = False) -> dict:
    """Shards from a long-document books corpus: one book = one document, [BOS] + encode(book).

    books: a folder with books_val.txt.xz and books_train.txt.xz. Val shards hold the val file's
    books and train shards the train file's, each in file order (the corpus's by-author split,
    never shuffled); max_*_books keep the first N of a split. The files are streamed. A trained
    tokenizer (tokenizer=None) sees the first 50M chars of the (capped) train books. Same
    staging and overwrite rules as build_dataset; the summary adds the books folder, the caps
    and, per split, the tokens-per-book distribution (doc_tokens).
    """
    started = time.monotonic()
    progress = Progress(quiet)
    out_dir = Path(out_dir)
    _check_build_args(shard_tokens, tokenizer, vocab_size)
    for flag, cap in (("--max-val-books", max_val_books), ("--max-train-books", max_train_books)):
        if cap is not None and cap < 1:
            raise DatasetError(f"{flag} {cap}: must be at least 1")
    files = books_files(books)
    old_shards = _check_out_dir(out_dir, force)
    splits = {"val": BookFile(files["val"], max_val_books), "train": BookFile(files["train"], max_train_books)}
    caps = {"val": max_val_books, "train": max_train_books}
    progress.log(f"books: {files['val']} -> val, {files['train']} -> train, in file order"
                 + "".join(f", first {cap:,} {split}" for split, cap in caps.items() if cap))

    tok = _prepare_tokenizer(out_dir, tokenizer, tokenizer_out, vocab_size, seed, force, progress,
                             BookFile(files["train"], max_train_books),
                             f"at most the first {TOKENIZER_TRAIN_CHARS:,} chars of {files['train'].name}")
    written = _write_splits(out_dir, old_shards, tok, splits, shard_tokens, progress,
                            {split: dict(unit="books", where=book_file) for split, book_file in splits.items()})
    n_val, n_train = (written["doc_tokens"][split]["docs"] for split in ("val", "train"))
    summary = {**_summary_head(out_dir, tok, seed), "books": str(Path(books)),
               "max_val_books": max_val_books, "max_train_books": max_train_books,
               "docs": n_val + n_train, "val_docs": n_val, "train_docs": n_train,
               **written, "seconds": round(time.monotonic() - started, 2)}
    _log_written(progress, out_dir, summary)
    return summary


def _check_build_args(shard_tokens: int, tokenizer, vocab_size: int) -> None:
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise DatasetError(f"--shard-tokens {shard_tokens}: must be in 1..{MAX_SHARD_TOKENS}")
    if tokenizer is None:
        _check_vocab_size(vocab_size)


def _check_out_dir(out_dir: Path, force: bool) -> list[Path]:
    """The shards already in out_dir (to replace), or an error if there are some and not force."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"--out {out_dir}: exists and is not a folder")
    old_shards = shard_paths(out_dir, "val") + shard_paths(out_dir, "train")
    if old_shards and not force:
        raise DatasetError(f"--out {out_dir}: already holds {len(old_shards)} shard(s) "
                           f"(e.g. {old_shards[0].name}); pass --force to replace them")
    return old_shards


class _Tokenizer:
    def __init__(self, sp, model_bytes: bytes, source: str, path: Path):
        self.sp, self.model_bytes, self.source, self.path = sp, model_bytes, source, path


def _prepare_tokenizer(out_dir: Path, tokenizer, tokenizer_out, vocab_size: int, seed: int, force: bool,
                       progress: "Progress", train_docs: Iterable[str], train_desc: str) -> _Tokenizer:
    """Load --tokenizer, or train one on train_docs; check where it will be written."""
    if tokenizer is not None:
        sp = load_tokenizer(tokenizer)
        model_bytes = Path(tokenizer).read_bytes()  # copied verbatim
        source = str(tokenizer)
    else:
        t0 = time.monotonic()
        sp = train_tokenizer(train_docs, vocab_size, seed=seed)
        source = f"trained BPE on {train_desc}"
        model_bytes = sp.serialized_model_proto()
        progress.log(f"tokenizer: trained vocab {vocab_size} in {time.monotonic() - t0:.1f}s")
    path = Path(tokenizer_out) if tokenizer_out else out_dir / f"fineweb_{sp.vocab_size()}_bpe.model"
    if path.exists() and not force and path.read_bytes() != model_bytes:
        raise DatasetError(f"--tokenizer-out {path}: a different file exists; pass --force to replace it")
    return _Tokenizer(sp, model_bytes, source, path)


def _write_splits(out_dir: Path, old_shards: list[Path], tok: _Tokenizer, splits: dict, shard_tokens: int,
                  progress: "Progress", encode_opts: dict) -> dict:
    """Encode each split into a staging folder, then swap the shards in and write the tokenizer.

    Returns the summary's per-split fields: chars, tokens, shard names, tokens per document.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        names, stats = {}, {}
        for split, docs in splits.items():
            writer = _ShardWriter(staging, split, shard_tokens)
            stats[split] = _encode_split(tok.sp, split, docs, writer, progress, **encode_opts[split])
            names[split] = writer.names
        for path in old_shards:
            path.unlink()
        for name in names["val"] + names["train"]:
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tok.path.parent.mkdir(parents=True, exist_ok=True)
    if not tok.path.exists() or tok.path.read_bytes() != tok.model_bytes:
        write_atomic(tok.path, tok.model_bytes)
    return {
        "chars": sum(s.chars for s in stats.values()),
        "val_tokens": stats["val"].tokens,
        "train_tokens": stats["train"].tokens,
        "val_shards": names["val"],
        "train_shards": names["train"],
        "doc_tokens": {split: s.distribution() for split, s in stats.items()},
    }


def _summary_head(out_dir: Path, tok: _Tokenizer, seed: int) -> dict:
    return {"out_dir": str(out_dir), "tokenizer_path": str(tok.path), "tokenizer_source": tok.source,
            "vocab_size": tok.sp.vocab_size(), "seed": seed}


def _log_written(progress: "Progress", out_dir: Path, summary: dict) -> None:
    progress.log(f"wrote {len(summary['val_shards'])} val + {len(summary['train_shards'])} train shards "
                 f"({summary['val_tokens']:,} + {summary['train_tokens']:,} tokens) to {out_dir}")


def _val_count(val_frac: float, n_docs: int) -> int:
    if not 0.0 < val_frac < 1.0:
        raise DatasetError(f"--val-frac {val_frac}: must be strictly between 0 and 1")
    return max(1, round(val_frac * n_docs))


class _SplitStats:
    """What one split's encoding produced: documents, chars, tokens (BOS included), lengths."""

    def __init__(self):
        self.lengths: list[int] = []  # tokens per document, its BOS excluded
        self.chars = 0
        self.tokens = 0

    def distribution(self) -> dict:
        """Tokens per document (without its BOS): count, min, median, max."""
        lengths = self.lengths or [0]
        median = statistics.median(lengths)  # the mean of the middle two for an even count
        return {"docs": len(self.lengths), "min": min(lengths),
                "median": int(median) if float(median).is_integer() else median, "max": max(lengths)}


def _batches(docs: Iterable[str]) -> Iterator[list[str]]:
    """Consecutive documents, at most ENCODE_BATCH_DOCS of them or ENCODE_BATCH_CHARS chars (a whole doc more)."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encode_split(sp, split: str, docs: Iterable[str], writer: _ShardWriter, progress: Progress, *,
                  unit: str = "docs", total: int | None = None, where: BookFile | None = None) -> _SplitStats:
    """Write [BOS] + encode(doc) for each doc, in order, batch by batch (docs may be a stream)."""
    t0, stats = time.monotonic(), _SplitStats()
    threads = os.cpu_count() or 1
    bos = np.array([BOS_ID], dtype=np.uint16)
    for batch in _batches(docs):
        for ids in sp.encode(batch, num_threads=threads):
            writer.add(bos)
            writer.add(np.array(ids, dtype=np.uint16))
            stats.lengths.append(len(ids))
            stats.tokens += 1 + len(ids)
        stats.chars += sum(map(len, batch))
        done = len(stats.lengths)
        rate = stats.tokens / max(time.monotonic() - t0, 1e-9)
        count = f"{done:,}/{total:,}" if total is not None else f"{done:,}"
        read = f" ({where.fraction():.0%} of {where.path.name})" if where is not None else ""
        progress.status(f"encode {split}: {count} {unit}{read}, {stats.tokens:,} tokens, "
                        f"{rate / 1e6:.2f}M tok/s")
    writer.flush()
    d, seconds = stats.distribution(), time.monotonic() - t0
    progress.status(f"encode {split}: {d['docs']:,}{'' if total is None else f'/{total:,}'} {unit}, "
                    f"{stats.chars:,} chars, {stats.tokens:,} tokens in {seconds:.1f}s; tokens per "
                    f"{unit[:-1]} min {d['min']:,} / median {d['median']:,} / max {d['max']:,}", final=True)
    return stats


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Challenge layout (the host's default DATA_PATH and TOKENIZER_PATH):\n"
               "  python tools/make_dataset.py --out data/datasets/fineweb10B_sp1024 \\\n"
               "      --tokenizer-out data/tokenizers/fineweb_1024_bpe.model\n"
               "Long documents (one book = one document; val = books_val, train = books_train):\n"
               "  python tools/make_dataset.py --books --tokenizer ../shared/tokenizers/fineweb_1024_bpe.model \\\n"
               "      --out data/books_sp1024\n"
               "  then DATA_PATH=data/books_sp1024 TOKENIZER_PATH=data/books_sp1024/fineweb_1024_bpe.model")
    parser.add_argument("--out", required=True, type=Path, help="folder for the shards")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", nargs="+", type=Path, metavar="PATH",
                        help="text/markdown/JSONL files or folders (default: built-in CPython docs)")
    source.add_argument("--books", nargs="?", type=Path, const=BOOKS_DEFAULT, metavar="DIR",
                        help="books corpus folder with books_val.txt.xz + books_train.txt.xz "
                             "(DIR defaults to ../shared/corpus next to the repository)")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", type=Path, metavar="MODEL", help="use this SentencePiece .model")
    tok.add_argument("--vocab-size", type=int, default=1024, metavar="V",
                     help="train a BPE tokenizer of this size (default 1024)")
    parser.add_argument("--tokenizer-out", type=Path, metavar="PATH",
                        help="where the .model goes (default OUT/fineweb_{V}_bpe.model)")
    val = parser.add_mutually_exclusive_group()
    val.add_argument("--val-docs", type=int, metavar="N", help="number of val documents")
    val.add_argument("--val-frac", type=float, metavar="F",
                     help="fraction of documents for val (default 0.1)")
    parser.add_argument("--max-val-books", type=int, metavar="N", help="with --books: only the first N val books")
    parser.add_argument("--max-train-books", type=int, metavar="N", help="with --books: only the first N train books")
    parser.add_argument("--shard-tokens", type=int, default=10**8, metavar="N", help="tokens per shard (default 1e8)")
    parser.add_argument("--seed", type=int, default=1337, metavar="S",
                        help="document shuffle and tokenizer seed (default 1337)")
    parser.add_argument("--max-docs", type=int, metavar="N", help="keep only N documents after shuffling")
    parser.add_argument("--force", action="store_true", help="replace shards/tokenizer already in place")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return parser.parse_args(argv)


def _check_source_options(args: argparse.Namespace) -> None:
    """Options of one kind of input given with the other: refuse them rather than ignore them."""
    if args.books is not None:
        for flag, value in (("--val-docs", args.val_docs), ("--val-frac", args.val_frac), ("--max-docs", args.max_docs)):
            if value is not None:
                raise DatasetError(f"{flag}: not used with --books (the corpus has its own val file, "
                                   "kept whole and unshuffled); use --max-val-books / --max-train-books")
    else:
        for flag, value in (("--max-val-books", args.max_val_books), ("--max-train-books", args.max_train_books)):
            if value is not None:
                raise DatasetError(f"{flag}: only used with --books")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        _check_source_options(args)
        common = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size, tokenizer_out=args.tokenizer_out,
                      shard_tokens=args.shard_tokens, seed=args.seed, force=args.force, quiet=args.quiet)
        if args.books is not None:
            summary = build_books_dataset(args.out, args.books, max_val_books=args.max_val_books,
                                          max_train_books=args.max_train_books, **common)
        else:
            if args.text:
                docs = load_documents(args.text)
            else:
                t0 = time.monotonic()
                docs = builtin_corpus()
                if not args.quiet:
                    print(f"built-in corpus: {len(docs):,} docs, {sum(map(len, docs)):,} chars "
                          f"(Python {sys.version.split()[0]}, {time.monotonic() - t0:.1f}s)", file=sys.stderr)
            summary = build_dataset(
                args.out, docs, val_docs=args.val_docs,
                val_frac=0.1 if args.val_frac is None else args.val_frac, max_docs=args.max_docs, **common)
    except DatasetError as e:
        print(f"make_dataset.py: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
