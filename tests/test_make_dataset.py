"""tools/make_dataset.py: shard format, export semantics, tokenizer, safety, CLI."""

import json
import lzma
import random
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
import make_dataset as md

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "fineweb_1024_bpe.model"
SHARED_BOOKS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november "
         "oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu the quick "
         "brown fox jumps over lazy dog").split()
VOCAB = 320


def make_docs(n, seed=0):
    """ASCII, single-spaced docs: they survive nmt_nfkc normalization unchanged."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + f" number {i}." for i in range(n)]


def shuffled(docs, seed):
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    return [docs[i] for i in order]


def read_split(folder, split):
    paths = md.shard_paths(folder, split)
    return paths, (np.concatenate([md.read_shard(p) for p in paths]) if paths else np.zeros(0, np.uint16))


def split_docs(tokens):
    """Token stream -> per-document id lists, cutting at each BOS."""
    starts = np.flatnonzero(tokens == md.BOS_ID)
    assert starts[0] == 0
    return [tokens[a + 1:b].tolist() for a, b in zip(starts, [*starts[1:], len(tokens)])]


def listing(folder):
    return sorted(p.name for p in Path(folder).iterdir())


# ---------------------------------------------------------------- shard format

def test_shard_roundtrip_exact_bytes(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    md.write_shard(path, [1, 2, 65535, 0, 300])
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * 5
    header = struct.unpack("<256i", raw[:1024])
    assert header[:3] == (20240520, 1, 5) and set(header[3:]) == {0}
    assert raw[1024:] == struct.pack("<5H", 1, 2, 65535, 0, 300)
    tokens = md.read_shard(path)
    assert tokens.dtype == np.uint16 and tokens.tolist() == [1, 2, 65535, 0, 300]
    assert listing(tmp_path) == ["fineweb_val_000000.bin"]  # no temp file left


def test_shard_refuses_too_many_tokens_and_out_of_range_ids(tmp_path):
    huge = np.broadcast_to(np.uint16(1), (2**31,))  # no memory: a stride-0 view
    with pytest.raises(md.DatasetError, match="2,147,483,648 tokens"):
        md.write_shard(tmp_path / "a.bin", huge)
    with pytest.raises(md.DatasetError, match="70000"):
        md.write_shard(tmp_path / "a.bin", [1, 70000])
    assert listing(tmp_path) == []


def test_read_shard_rejects_wrong_size_and_magic(tmp_path):
    path = tmp_path / "s.bin"
    md.write_shard(path, [5, 6, 7])
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(md.DatasetError, match=r"size 1028 != 1024 \+ 2\*3"):
        md.read_shard(path)
    path.write_bytes(b"\0" * 1024)
    with pytest.raises(md.DatasetError, match="magic 20240520"):
        md.read_shard(path)


def test_write_shard_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(md.os, "fsync", disk_full)  # the data is written, the sync fails
    with pytest.raises(OSError, match="disk full"):
        md.write_shard(tmp_path / "fineweb_train_000000.bin", np.arange(1000))
    assert listing(tmp_path) == []


def test_write_atomic_replaces_the_whole_file_and_keeps_its_mode(tmp_path):
    """patch_host.py writes scripts with it: an executable train_gpt.py stays executable."""
    path = tmp_path / "train_gpt.py"
    path.write_text("old")
    path.chmod(0o751)
    md.write_atomic(path, b"new ", b"script")
    assert path.read_bytes() == b"new script" and path.stat().st_mode & 0o7777 == 0o751 and listing(tmp_path) == ["train_gpt.py"]
    md.write_atomic(tmp_path / "fresh.bin", b"x")  # a new file: the default mode, nothing to copy
    assert (tmp_path / "fresh.bin").read_bytes() == b"x"


def test_builtin_shards_builds_once_then_reuses(tmp_path, monkeypatch, trained):
    """The demo's and the benchmarks' data: built on the first call (tokenizer given: copied where asked),
    then reused as it is while the folder holds a val shard."""
    docs = make_docs(40)
    monkeypatch.setattr(md, "builtin_corpus", lambda: docs)
    tok = tmp_path / "given.model"
    tok.write_bytes(trained.serialized_model_proto())
    data, tokenizer = md.builtin_shards(tmp_path / "data", tmp_path / "tok" / "t.model", tokenizer=tok)
    assert tokenizer.read_bytes() == tok.read_bytes() and md.shard_paths(data, "val") and md.shard_paths(data, "train")
    before = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    monkeypatch.setattr(md, "builtin_corpus", lambda: pytest.fail("rebuilt although the shards are there"))
    assert md.builtin_shards(data, tokenizer) == (data, tokenizer)
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == before


def test_shard_writer_fills_shards_exactly_and_splits_documents(tmp_path):
    writer = md._ShardWriter(tmp_path, "train", shard_tokens=5)
    for doc in ([1, 10, 11], [1, 12, 13, 14], [1, 15, 16, 17, 18]):
        writer.add(np.array(doc, dtype=np.uint16))
    writer.flush()
    assert writer.names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [md.read_shard(tmp_path / n).tolist() for n in writer.names] == [
        [1, 10, 11, 1, 12], [13, 14, 1, 15, 16], [17, 18]]


# ---------------------------------------------------------------- documents

def test_load_documents_paragraphs_jsonl_and_folders(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.md").write_text("# Title\n\nbody one\nline two\n")
    (tmp_path / "a.txt").write_text("a b\n\n\nc\n  \nd e\n")
    (tmp_path / "c.jsonl").write_text('{"text": "first doc"}\n\n{"text": "second\\n\\ndoc", "id": 7}\n')
    (tmp_path / "skip.bin").write_bytes(b"\xff\xfe")
    assert md.load_documents([tmp_path]) == [
        "a b", "c", "d e", "# Title", "body one\nline two", "first doc", "second\n\ndoc"]
    assert md.load_documents([tmp_path / "c.jsonl", tmp_path / "a.txt"]) == [
        "first doc", "second\n\ndoc", "a b", "c", "d e"]


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "missing.txt: no such file or folder"),
    ("blank.txt", "\n \n\n", "no non-empty documents"),
    ("bad.jsonl", '{"text": "ok"}\n{"txt": "x"}\n',
     r"bad.jsonl:2: expected an object with a string 'text' field, got \['txt'\]"),
    ("broken.jsonl", '{"text": "ok"}\n\n{"text": \n', r"broken.jsonl:3: invalid JSON"),
    ("latin1.txt", b"caf\xe9", "latin1.txt: not UTF-8"),
])
def test_load_documents_errors_name_the_bad_input(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(md.DatasetError, match=message):
        md.load_documents([path])


def test_empty_folder_names_valid_suffixes(tmp_path):
    with pytest.raises(md.DatasetError, match=r"has no \.txt, \.md, \.jsonl files"):
        md.load_documents([tmp_path])


def test_builtin_corpus_is_large_deterministic_and_skips_tests_and_gui():
    first, second = md.builtin_corpus(), md.builtin_corpus()
    assert first == second
    assert len(first) > 500 and sum(map(len, first)) > 1_000_000
    heads = {doc.split("\n", 1)[0] for doc in first}
    assert {"json", "collections", "math", "builtins"} <= heads
    assert any("\n\nbuiltins.len(obj, /)\nReturn the number of items in a container." in doc for doc in first)
    assert any("\n\njson.dumps(obj, *, skipkeys=False," in doc for doc in first)
    assert not any(h.startswith(("idlelib", "tkinter", "turtle", "test.", "unittest.test")) for h in heads)


# ---------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def trained():
    return md.train_tokenizer(make_docs(300), VOCAB, seed=1)


def test_trained_tokenizer_ids_byte_fallback_and_size(trained):
    sp = trained
    assert sp.vocab_size() == VOCAB
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 4, 259)] == ["<pad>", "<s>", "</s>", "<unk>", "<0x00>", "<0xFF>"]
    assert all(sp.is_byte(i) for i in range(4, 260))
    assert sp.piece_to_id("\u2581") != sp.unk_id()
    ids = sp.encode("caf\u00e9 12")  # é is unseen: byte fallback; digits split
    assert [sp.id_to_piece(i) for i in ids[-4:]] == ["<0xA9>", "\u2581", "1", "2"]
    assert sp.decode(ids) == "caf\u00e9 12"


def test_tokenizer_training_is_deterministic(trained):
    again = md.train_tokenizer(make_docs(300), VOCAB, seed=1)
    assert again.serialized_model_proto() == trained.serialized_model_proto()


def test_tokenizer_errors_name_the_value(tmp_path):
    with pytest.raises(md.DatasetError, match="--vocab-size 70000: must be in 261..65535"):
        md.train_tokenizer(make_docs(10), 70000)
    with pytest.raises(md.DatasetError, match="--vocab-size 5000: the training text only supports"):
        md.train_tokenizer(make_docs(10), 5000)
    (tmp_path / "tok.txt").write_text("x")
    with pytest.raises(md.DatasetError, match=r"tok.txt: expected a SentencePiece \.model"):
        md.load_tokenizer(tmp_path / "tok.txt")
    (tmp_path / "tok.model").write_bytes(b"garbage")
    with pytest.raises(md.DatasetError, match="tok.model: not a readable SentencePiece model"):
        md.load_tokenizer(tmp_path / "tok.model")


# ---------------------------------------------------------------- dataset

def test_build_bos_per_doc_whole_doc_split_and_exact_decode(tmp_path):
    docs = make_docs(120)
    seed, n_val = 7, 12
    # A word only the val docs contain: the tokenizer must not learn it (trained on train only).
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    for i in order[:n_val]:
        docs[i] += " Qwertyuiop Qwertyuiop Qwertyuiop"
    summary = md.build_dataset(tmp_path, docs, vocab_size=VOCAB, val_docs=n_val, shard_tokens=700,
                               seed=seed, quiet=True)
    sp = spm.SentencePieceProcessor(model_file=summary["tokenizer_path"])
    assert summary["tokenizer_path"] == str(tmp_path / "fineweb_320_bpe.model")
    assert not any("Q" in sp.id_to_piece(i) for i in range(sp.vocab_size()))

    val_paths, val = read_split(tmp_path, "val")
    train_paths, train = read_split(tmp_path, "train")
    val_docs, train_docs = split_docs(val), split_docs(train)
    assert (len(val_docs), len(train_docs)) == (n_val, 108)
    assert [sp.decode(ids) for ids in val_docs + train_docs] == shuffled(docs, seed)
    assert all("Qwertyuiop" in sp.decode(ids) for ids in val_docs)
    # Shards: full except the last of each split (the split change flushes).
    for paths, tokens in ((val_paths, val), (train_paths, train)):
        sizes = [len(md.read_shard(p)) for p in paths]
        assert sizes[:-1] == [700] * (len(sizes) - 1) and 0 < sizes[-1] <= 700
        assert len(paths) == -(-len(tokens) // 700)
    assert (summary["val_tokens"], summary["train_tokens"]) == (len(val), len(train))
    assert summary["val_shards"] == [p.name for p in val_paths]
    assert summary["train_shards"] == [p.name for p in train_paths]
    assert [p.name for p in train_paths][:2] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("fineweb_")) == []


def test_val_frac_and_max_docs(tmp_path):
    summary = md.build_dataset(tmp_path, make_docs(200), vocab_size=VOCAB, val_frac=0.25, max_docs=100, quiet=True)
    assert (summary["docs"], summary["val_docs"], summary["train_docs"]) == (100, 25, 75)
    assert int((read_split(tmp_path, "val")[1] == 1).sum()) == 25


@pytest.mark.skipif(not SHARED_TOKENIZER.exists(), reason=f"{SHARED_TOKENIZER} not present")
def test_build_with_challenge_tokenizer(tmp_path):
    docs = ["Hello world 12345", "The quick brown fox jumps over the lazy dog.", "a b c"]
    out = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    tok_out = tmp_path / "data" / "tokenizers" / "fineweb_1024_bpe.model"
    summary = md.build_dataset(out, docs, tokenizer=SHARED_TOKENIZER, tokenizer_out=tok_out,
                               val_docs=1, seed=0, quiet=True)
    assert tok_out.read_bytes() == SHARED_TOKENIZER.read_bytes()
    assert summary["vocab_size"] == 1024
    sp = spm.SentencePieceProcessor(model_file=str(tok_out))
    stream = np.concatenate([read_split(out, "val")[1], read_split(out, "train")[1]])
    decoded = [sp.decode(ids) for ids in split_docs(stream)]
    assert decoded == shuffled(docs, 0)
    hello = split_docs(stream)[decoded.index("Hello world 12345")]
    assert hello == [981, 465, 943, 458, 401, 939, 972, 976, 994, 998, 995]


def test_refuses_to_overwrite_without_force_and_force_removes_stale_shards(tmp_path):
    docs = make_docs(60)
    first = md.build_dataset(tmp_path, docs, vocab_size=VOCAB, shard_tokens=300, quiet=True)
    assert len(first["train_shards"]) > 1
    with pytest.raises(md.DatasetError, match=rf"--out {tmp_path}: already holds \d+ shard\(s\).*--force"):
        md.build_dataset(tmp_path, docs, vocab_size=VOCAB, quiet=True)
    second = md.build_dataset(tmp_path, docs, vocab_size=VOCAB, force=True, quiet=True)
    assert listing(tmp_path) == ["fineweb_320_bpe.model", "fineweb_train_000000.bin", "fineweb_val_000000.bin"]
    assert second["train_tokens"] == first["train_tokens"]


def test_failure_mid_build_keeps_old_dataset_and_leaves_no_temp_files(tmp_path, monkeypatch):
    docs = make_docs(60)
    md.build_dataset(tmp_path, docs, vocab_size=VOCAB, quiet=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_write, calls = md.write_shard, []

    def fail_on_second(path, tokens):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_write(path, tokens)

    monkeypatch.setattr(md, "write_shard", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        md.build_dataset(tmp_path, docs, vocab_size=VOCAB, shard_tokens=300, force=True, quiet=True)
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(val_docs=40), r"--val-docs 40: must be in 1\.\.39 \(the corpus has 40 documents"),
    (dict(val_docs=0), r"--val-docs 0: must be in 1\.\.39"),
    (dict(val_frac=1.5), r"--val-frac 1\.5: must be strictly between 0 and 1"),
    (dict(vocab_size=65536), "--vocab-size 65536: must be in 261..65535"),
    (dict(shard_tokens=0), r"--shard-tokens 0: must be in 1\.\.2147483647"),
    (dict(max_docs=1), "--max-docs 1: must be at least 2"),
    (dict(tokenizer="nope.model"), "--tokenizer nope.model: no such file"),
])
def test_build_errors_name_the_value(tmp_path, kwargs, message):
    with pytest.raises(md.DatasetError, match=message):
        md.build_dataset(tmp_path / "out", make_docs(40), quiet=True, **kwargs)
    assert not (tmp_path / "out").exists() or listing(tmp_path / "out") == []


def test_build_refuses_a_corpus_of_one_document(tmp_path):
    with pytest.raises(md.DatasetError, match=r"the corpus has 1 document\(s\); need at least 2"):
        md.build_dataset(tmp_path, ["only one"], quiet=True)


# ---------------------------------------------------------------- CLI

def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "make_dataset.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_help_and_end_to_end_on_builtin_corpus(tmp_path):
    help_run = run_cli("--help")
    assert help_run.returncode == 0
    assert "--tokenizer-out" in help_run.stdout and "data/datasets/fineweb10B_sp1024" in help_run.stdout

    out = tmp_path / "ds"
    run = run_cli("--out", out, "--max-docs", 40, "--val-docs", 4, "--vocab-size", 512, "--shard-tokens", 50_000)
    assert run.returncode == 0, run.stderr
    assert "built-in corpus:" in run.stderr and "encode train: 36/36 docs" in run.stderr
    summary = json.loads(run.stdout)
    assert (summary["docs"], summary["val_docs"], summary["vocab_size"]) == (40, 4, 512)
    assert listing(out)[0] == "fineweb_512_bpe.model"
    assert [p.name for p in md.shard_paths(out, "train")] == summary["train_shards"]
    assert sum(len(md.read_shard(p)) for p in md.shard_paths(out, "val")) == summary["val_tokens"]


def test_cli_bad_input_exits_2_with_named_value(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("one\n\ntwo\n\nthree\n")
    run = run_cli("--out", tmp_path / "ds", "--text", text, "--val-docs", 3, "--quiet")
    assert run.returncode == 2 and run.stdout == ""
    assert "make_dataset.py: error: --val-docs 3: must be in 1..2 (the corpus has 3 documents" in run.stderr


# ---------------------------------------------------------------- books corpus (long documents)

def make_book(rng, title, paragraphs, extra=""):
    """A title, then paragraphs separated by blank lines ("\n\n"), some with a line break inside."""
    paras = []
    for _ in range(paragraphs):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 70))] + ([extra] if extra else [])
        words[rng.randrange(len(words))] += "\n"
        paras.append(" ".join(words).replace("\n ", "\n") + ".")
    return f"{title}\n\n" + "\n\n".join(paras)


def write_books(folder, val, train):
    """The corpus layout: xz text, books separated by three newlines, a separator after the last."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, books in (("books_val.txt.xz", val), ("books_train.txt.xz", train)):  # names spelled out
        with lzma.open(folder / name, "wt", encoding="utf-8") as f:
            f.write("\n\n\n".join(books) + "\n\n\n")
    return folder


@pytest.fixture
def books(tmp_path):
    """3 val books (each with a word no train book has) and 4 train books, one of them one paragraph.
    Titles count down: file order is not sorted order."""
    rng = random.Random(5)
    val = [make_book(rng, f"Val book {9 - i}", n, extra="Qwertyuiop") for i, n in enumerate((6, 3, 9))]
    train = [make_book(rng, f"Train book {9 - i}", n) for i, n in enumerate((8, 1, 12, 5))]
    return write_books(tmp_path / "corpus", val, train), val, train


@pytest.fixture
def tok_model(tmp_path, trained):
    path = tmp_path / "tok_320.model"
    path.write_bytes(trained.serialized_model_proto())
    return path


def test_books_one_bos_per_book_val_from_val_file_train_from_train_file_in_order(tmp_path, books, tok_model,
                                                                                 monkeypatch):
    folder, val_books, train_books = books
    assert all("\n\n" in b for b in val_books + train_books)
    monkeypatch.setattr(md, "READ_CHUNK_CHARS", 7)  # separators straddle the streaming reads
    out = tmp_path / "out"
    summary = md.build_books_dataset(out, folder, tokenizer=tok_model, shard_tokens=300, quiet=True)
    sp = spm.SentencePieceProcessor(model_file=str(tok_model))
    for split, expected in (("val", val_books), ("train", train_books)):
        paths, tokens = read_split(out, split)
        assert len(paths) > 1  # books run across shards
        assert int((tokens == md.BOS_ID).sum()) == len(expected)
        assert split_docs(tokens) == [sp.encode(book) for book in expected]
        lengths = [len(sp.encode(book)) for book in expected]
        assert summary["doc_tokens"][split] == {"docs": len(expected), "min": min(lengths),
                                                "median": statistics.median(lengths), "max": max(lengths)}
        assert summary[f"{split}_tokens"] == len(tokens) == sum(lengths) + len(expected)
        assert summary[f"{split}_shards"] == [p.name for p in paths]
    assert (summary["docs"], summary["val_docs"], summary["train_docs"]) == (7, 3, 4)
    assert summary["chars"] == sum(map(len, val_books + train_books))
    assert (summary["books"], summary["max_val_books"], summary["max_train_books"]) == (str(folder), None, None)
    assert summary["tokenizer_path"] == str(out / "fineweb_320_bpe.model")
    assert not any(p.name.startswith(".") for p in out.iterdir())


def test_books_caps_keep_the_first_books_of_each_split(tmp_path, books, tok_model):
    folder, val_books, train_books = books
    sp = spm.SentencePieceProcessor(model_file=str(tok_model))
    summary = md.build_books_dataset(tmp_path / "a", folder, tokenizer=tok_model, max_val_books=1,
                                     max_train_books=2, quiet=True)
    assert split_docs(read_split(tmp_path / "a", "val")[1]) == [sp.encode(val_books[0])]
    assert split_docs(read_split(tmp_path / "a", "train")[1]) == [sp.encode(b) for b in train_books[:2]]
    assert (summary["val_docs"], summary["train_docs"], summary["max_val_books"], summary["max_train_books"]) == (1, 2, 1, 2)
    assert summary["chars"] == len(val_books[0]) + len(train_books[0]) + len(train_books[1])
    more = md.build_books_dataset(tmp_path / "b", folder, tokenizer=tok_model, max_val_books=50, quiet=True)
    assert (more["val_docs"], more["train_docs"]) == (3, 4)
    with pytest.raises(md.DatasetError, match="--max-train-books 0: must be at least 1"):
        md.build_books_dataset(tmp_path / "c", folder, tokenizer=tok_model, max_train_books=0, quiet=True)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1 << 20])
def test_book_file_splits_at_three_newlines_only(tmp_path, monkeypatch, chunk):
    path = tmp_path / "b.txt.xz"
    with lzma.open(path, "wb") as f:  # bytes: keep the "\r\n"
        f.write("\nOne\n\npara two\nline\n\n\n\n\nTwo \u00e9\n\n\n\n\n\nThree\r\nend".encode())
    monkeypatch.setattr(md, "READ_CHUNK_CHARS", chunk)
    book_file = md.BookFile(path)
    assert list(book_file) == ["One\n\npara two\nline", "Two \u00e9", "Three\nend"]
    assert (book_file.books, book_file.fraction()) == (3, 1.0)
    assert list(md.BookFile(path, limit=2)) == ["One\n\npara two\nline", "Two \u00e9"]


@pytest.mark.parametrize("content, message", [
    (b"not xz at all", r"books_train.txt.xz: not a readable \.xz file"),
    (lzma.compress(b"caf\xe9"), r"books_train.txt.xz: not UTF-8 text"),
    (lzma.compress(b"\n\n\n\n\n\n"), r"books_train.txt.xz: no books found"),
], ids=["not-xz", "not-utf8", "no-books"])
def test_bad_books_file_fails_and_keeps_the_old_dataset(tmp_path, books, tok_model, content, message):
    folder, _, _ = books
    out = tmp_path / "out"
    md.build_books_dataset(out, folder, tokenizer=tok_model, shard_tokens=200, quiet=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (folder / "books_train.txt.xz").write_bytes(content)
    with pytest.raises(md.DatasetError, match=message):
        md.build_books_dataset(out, folder, tokenizer=tok_model, shard_tokens=50, force=True, quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new val shard, no staging folder


def test_books_folder_errors_name_the_path_and_what_is_expected(tmp_path, books, tok_model):
    folder, _, _ = books
    (folder / "books_val.txt.xz").unlink()
    with pytest.raises(md.DatasetError, match=rf"--books {folder}: no books_val.txt.xz; expected a folder holding"):
        md.build_books_dataset(tmp_path / "out", folder, tokenizer=tok_model, quiet=True)
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(md.DatasetError, match=r"b.txt: not a folder; expected a folder holding"):
        md.build_books_dataset(tmp_path / "out", tmp_path / "b.txt", tokenizer=tok_model, quiet=True)
    assert not (tmp_path / "out").exists()


def test_cli_books_missing_corpus_one_line_error_writes_nothing(tmp_path):
    missing = tmp_path / "no_corpus"
    run = run_cli("--books", missing, "--out", tmp_path / "ds", "--tokenizer", tmp_path / "t.model")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == (f"make_dataset.py: error: --books {missing}: no such folder; expected a folder holding "
                          "books_val.txt.xz and books_train.txt.xz (xz-compressed UTF-8 text, books separated "
                          "by three newlines)\n")
    assert not (tmp_path / "ds").exists()


def test_cli_books_default_path_and_options_of_the_other_input_refused(tmp_path):
    assert md.BOOKS_DEFAULT == REPO.parent / "shared" / "corpus"
    assert md.parse_args(["--out", "x", "--books"]).books == md.BOOKS_DEFAULT
    assert md.parse_args(["--out", "x", "--books", "--tokenizer", "t.model"]).tokenizer == Path("t.model")
    for args, message in ((["--books", "--val-docs", "2"], "--val-docs: not used with --books"),
                          (["--books", "--val-frac", "0.2"], "--val-frac: not used with --books"),
                          (["--books", "--max-docs", "9"], "--max-docs: not used with --books"),
                          (["--max-val-books", "1"], "--max-val-books: only used with --books")):
        run = run_cli("--out", tmp_path / "ds", *args)
        assert run.returncode == 2 and run.stderr.startswith(f"make_dataset.py: error: {message}"), run.stderr
        assert run.stderr.count("\n") == 1 and not (tmp_path / "ds").exists()


def test_cli_books_end_to_end_with_a_tokenizer_trained_on_train_books(tmp_path, books):
    folder, val_books, train_books = books
    out = tmp_path / "ds"
    run = run_cli("--books", folder, "--out", out, "--vocab-size", VOCAB, "--max-val-books", 2, "--shard-tokens", 400)
    assert run.returncode == 0, run.stderr
    assert "encode val: 2 books" in run.stderr and "encode train: 4 books" in run.stderr
    assert "tokens per book min" in run.stderr
    summary = json.loads(run.stdout)
    assert (summary["val_docs"], summary["train_docs"], summary["vocab_size"]) == (2, 4, VOCAB)
    assert summary["tokenizer_source"].endswith("chars of books_train.txt.xz")
    assert set(summary["doc_tokens"]) == {"val", "train"}
    sp = spm.SentencePieceProcessor(model_file=summary["tokenizer_path"])
    assert not any("Q" in sp.id_to_piece(i) for i in range(sp.vocab_size()))  # val words unseen
    assert split_docs(read_split(out, "val")[1]) == [sp.encode(b) for b in val_books[:2]]
    assert split_docs(read_split(out, "train")[1]) == [sp.encode(b) for b in train_books]


@pytest.mark.skipif(not (SHARED_BOOKS / "books_val.txt.xz").is_file(), reason=f"{SHARED_BOOKS} not present")
@pytest.mark.skipif(not SHARED_TOKENIZER.exists(), reason=f"{SHARED_TOKENIZER} not present")
def test_real_books_are_documents_longer_than_10k_tokens(tmp_path):
    summary = md.build_books_dataset(tmp_path, SHARED_BOOKS, tokenizer=SHARED_TOKENIZER, max_val_books=2,
                                     max_train_books=1, quiet=True)
    val_docs = split_docs(read_split(tmp_path, "val")[1])
    train_docs = split_docs(read_split(tmp_path, "train")[1])
    assert (len(val_docs), len(train_docs)) == (2, 1)
    assert all(len(doc) > 10_000 for doc in val_docs + train_docs)
    assert summary["doc_tokens"]["val"]["min"] > 10_000
    with lzma.open(SHARED_BOOKS / "books_val.txt.xz", "rt", encoding="utf-8") as f:
        first = [b for b in f.read().split("\n\n\n") if b.strip()][:2]
    sp = spm.SentencePieceProcessor(model_file=str(SHARED_TOKENIZER))
    assert val_docs == [sp.encode(book) for book in first]
