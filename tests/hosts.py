"""The challenge's real host scripts (../shared/hosts/) as CPU test subjects, through tests/host_cpu.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TOKENIZERS, clean_env, real_tokenizer, write_shard

import patch_host
from host_cpu import cpu_copy

HOSTS = REPO.parent / "shared" / "hosts"
MODULE_SOURCE = (REPO / "hymba_layer.py").read_text(encoding="utf-8")
FILES = {"record": "record_0429_train_gpt.py"}  # host (host_cpu.py --host) -> fixture, where not NAME_train_gpt.py


def host_text(name: str) -> str:
    """The fixture script as shipped; skips the test where ../shared/hosts/ is absent."""
    path = HOSTS / FILES.get(name, f"{name}_train_gpt.py")
    if not path.is_file():
        pytest.skip(f"{path} not present (the challenge's host scripts are test fixtures of this project's workspace)")
    return path.read_text(encoding="utf-8")


def write_script(path: Path, name: str, patched: bool) -> Path:
    text = host_text(name)
    if patched:
        text = patch_host.patch_text(text, MODULE_SOURCE)
    path.write_text(cpu_copy(name, text), encoding="utf-8")
    return path


def host_env(**settings) -> dict[str, str]:
    """A clean env for a host run on CPU: no compile (its graph is tested elsewhere), one thread."""
    env = clean_env(**settings)
    env.update(TORCHDYNAMO_DISABLE="1", PYTHONHASHSEED="0")
    return env


def sp8192_data_dir(root: Path, val_docs: list[str], train_docs: list[str], seq_len: int) -> Path:
    """DATA_DIR as the sp8192 hosts read it (datasets/fineweb10B_sp8192/ and tokenizers/fineweb_8192_bpe.model):
    the docs as [BOS] + tokens with the challenge's real sp8192 model (skip without it). The val shard is
    cut to a whole number of `seq_len` sequences + 1, ending inside its last doc (>= 2 tokens of it)."""
    sp = real_tokenizer(8192)
    (root / "tokenizers").mkdir(parents=True)
    shutil.copy(TOKENIZERS / "fineweb_8192_bpe.model", root / "tokenizers" / "fineweb_8192_bpe.model")
    stream = lambda docs: np.concatenate([[sp.bos_id()] + sp.encode(d) for d in docs])
    shards = root / "datasets" / "fineweb10B_sp8192"
    shards.mkdir(parents=True)
    val = stream(val_docs)
    val = val[: (val.size - 1) // seq_len * seq_len + 1]
    assert np.flatnonzero(val == sp.bos_id())[-1] <= val.size - 2, "the cut leaves a 1-token last doc"
    write_shard(shards / "fineweb_val_000000.bin", val)
    write_shard(shards / "fineweb_train_000000.bin", stream(train_docs))
    return root
