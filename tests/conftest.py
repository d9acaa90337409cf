"""Shared test helpers: shards (make_dataset's writer, with a bad header on request), a tokenizer trained by
make_dataset, a small shard dataset, and a clean environment for running train_gpt.py as a subprocess."""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

import make_dataset

REPO = Path(__file__).resolve().parents[1]
TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
HEADER_FIELDS = ("magic", "version", "count")  # the first three int32 of a shard's header


def write_shard(path, tokens, **header: int) -> Path:
    """A challenge shard, written by make_dataset.write_shard; `header` (magic=, version=, count=) then
    overwrites those header fields, to make a shard the host must refuse."""
    path = Path(path)
    make_dataset.write_shard(path, tokens)
    if header:
        raw = bytearray(path.read_bytes())
        for name, value in header.items():
            struct.pack_into("<i", raw, 4 * HEADER_FIELDS.index(name), value)
        path.write_bytes(bytes(raw))
    return path


def corpus_docs() -> list[str]:
    """~465 KB of English technical prose (the Python docs' help topics), in a fixed order."""
    import pydoc_data.topics as topics
    return [topics.topics[k] for k in sorted(topics.topics)]


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    """make_dataset's BPE (the challenge's SentencePiece settings) with 512 pieces, trained on the corpus's lines."""
    lines = [line for doc in corpus_docs() for line in doc.splitlines() if line.strip()]
    path = tmp_path_factory.mktemp("tokenizer") / "golf_512_bpe.model"
    path.write_bytes(make_dataset.train_tokenizer(lines, 512).serialized_model_proto())
    return path


@pytest.fixture(scope="session")
def sp(tokenizer_path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(tokenizer_path))


def real_tokenizer(vocab: int) -> spm.SentencePieceProcessor:
    path = TOKENIZERS / f"fineweb_{vocab}_bpe.model"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return spm.SentencePieceProcessor(model_file=str(path))


VAL_DOCS = 8  # the first docs are val, the rest train (like the challenge's export)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, sp, tokenizer_path) -> dict:
    """Shards of the corpus as the challenge stores them: each doc is [BOS] + encode(text), packed;
    one val shard and two train shards. Returns the paths and VOCAB_SIZE for train_gpt.py."""
    root = tmp_path_factory.mktemp("data")
    data = root / "datasets" / "golf"
    data.mkdir(parents=True)
    docs = corpus_docs()
    streams = [np.concatenate([[sp.bos_id()] + sp.encode(d) for d in part]) for part in (docs[:VAL_DOCS], docs[VAL_DOCS:])]
    val, train = streams
    write_shard(data / "fineweb_val_000000.bin", val)
    half = train.size // 2
    write_shard(data / "fineweb_train_000000.bin", train[:half])
    write_shard(data / "fineweb_train_000001.bin", train[half:])
    return dict(data_path=data, tokenizer_path=tokenizer_path, vocab_size=sp.vocab_size(), val_tokens=val.size, train_tokens=train.size)


# ----------------------------------------------------------------------------- subprocess runs

def _train_gpt_env_names() -> set[str]:
    """Every env var train_gpt.py reads, taken from its source so new settings are dropped too."""
    src = (REPO / "train_gpt.py").read_text(encoding="utf-8")
    names = set(re.findall(r'\b(?:env|flag)\(\s*"([A-Z0-9_]+)"', src))
    names |= set(re.findall(r'os\.environ(?:\.get\(|\[)\s*"([A-Z0-9_]+)"', src))
    return names | {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"}


def clean_env(**settings) -> dict[str, str]:
    """os.environ without the caller's HYMBA_* and train_gpt settings, plus `settings`. One OpenMP
    thread per process (what torchrun sets): 1- and 2-process runs do the same arithmetic, and a run
    does not crawl when the shared cores are busy."""
    drop = _train_gpt_env_names()
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("HYMBA_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in settings.items()})
    return env


@pytest.fixture
def hparams(monkeypatch):
    """make(**env) -> train_gpt.Hyperparameters read from exactly these env settings."""
    import train_gpt

    def make(**settings):
        for name in list(os.environ):
            if name in _train_gpt_env_names() or name.startswith("HYMBA_"):
                monkeypatch.delenv(name)
        for name, value in settings.items():
            monkeypatch.setenv(name, str(value))
        return train_gpt.Hyperparameters()
    return make


def run_train_gpt(cwd: Path, settings: dict, *, nproc: int = 1, timeout: float = 180) -> str:
    """Run train_gpt.py (under torch.distributed.run when nproc > 1) in `cwd`; return its output.
    A failure or timeout fails the test and shows what the run printed."""
    script = str(REPO / "train_gpt.py")
    cmd = [sys.executable, script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script]
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=clean_env(**settings), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s\n--- stdout\n{out}\n--- stderr\n{err}")
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc.stdout


def tiny_config(dataset: dict, run_id: str, **overrides) -> dict:
    """A 2-layer, 96-wide GPT on the test shards, with a deterministic schedule (no wallclock cap) and
    no compile. MLP_MULT=8 makes the MLP matrices 768x96 = 73,728 > 65,536 numel, so the export
    quantizes them to int8 (everything else is small enough to pass through)."""
    cfg = dict(
        DATA_PATH=dataset["data_path"], TOKENIZER_PATH=dataset["tokenizer_path"], VOCAB_SIZE=dataset["vocab_size"],
        RUN_ID=run_id, SEED=1337, NUM_LAYERS=2, MODEL_DIM=96, NUM_HEADS=2, NUM_KV_HEADS=1, MLP_MULT=8,
        TRAIN_SEQ_LEN=128, TRAIN_BATCH_TOKENS=8192, VAL_BATCH_SIZE=8192, ITERATIONS=40, WARMUP_STEPS=2,
        WARMDOWN_ITERS=10, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=10, MAX_WALLCLOCK_SECONDS=0, TORCH_COMPILE=0,
        COMPRESSOR="zlib",
    )
    cfg.update(overrides)
    return cfg


NUM = r"(-?[\d.]+(?:e[-+]?\d+)?|nan|inf)"  # a logged number


def grab(pattern: str, text: str) -> list[tuple[float, ...]]:
    """Every match of `pattern` in `text`, its groups as floats; write {n} for a logged number."""
    found = re.findall(pattern.replace("{n}", NUM), text, flags=re.M)
    return [tuple(float(g) for g in (m if isinstance(m, tuple) else (m,))) for m in found]


# torch.compile's default backend (inductor) writes C++ for the CPU: every test that compiles with it carries this
needs_inductor = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                                    reason="inductor needs a C++ compiler on the CPU: no g++ or c++ on PATH")
