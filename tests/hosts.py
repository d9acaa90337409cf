"""The challenge's real host scripts (../shared/hosts/) as CPU test subjects, through tools/host_cpu.py."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conftest import REPO, clean_env

sys.path.insert(0, str(REPO / "tools"))
import patch_host  # noqa: E402
from host_cpu import cpu_copy  # noqa: E402

HOSTS = REPO.parent / "shared" / "hosts"
MODULE_SOURCE = (REPO / "hymba_layer.py").read_text(encoding="utf-8")


def host_text(name: str) -> str:
    """The fixture script as shipped; skips the test where ../shared/hosts/ is absent."""
    path = HOSTS / f"{name}_train_gpt.py"
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
