"""Bad input, interrupted runs and distributed faults: train_gpt.py stops with a clear message, writes
no half-made outputs, and a failing rank brings the whole torchrun job down.

The contract pinned down here: a ValueError, FileNotFoundError or ImportError raised before the config
and the data are checked (train_gpt.setup_done still False) is a user error: `python train_gpt.py`
prints one line `train_gpt.py: error: ...` to stderr, exits 2 and has written nothing (no logs/, no
final_model.*). Under torchrun, @record still writes the error file, so torchrun's summary names it.
Anything raised later (training, export) is a bug or a fault: it keeps its traceback and exits 1;
an over-budget artifact exits 3. Faults are injected by the small wrappers in tests/faults/, which
patch one thing in train_gpt and call train_gpt.main().
"""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, TOKENIZERS, clean_env, grab, write_shard

FAULTS = REPO / "tests" / "faults"
TIMEOUT = 120  # a hung job fails the test instead of hanging the suite
SEQ_LEN, BATCH_TOKENS = 64, 4096
STEP_TOKENS = BATCH_TOKENS + 8  # one step on one process: 8 micro-batches of 512 tokens + 1 target each


@pytest.fixture(scope="module")
def tokenizer(request) -> tuple[Path, int]:
    """The challenge's sp1024 tokenizer when present, else the suite's self-trained one (vocab 512)."""
    path = TOKENIZERS / "fineweb_1024_bpe.model"
    if path.is_file():
        return path, 1024
    return request.getfixturevalue("tokenizer_path"), request.getfixturevalue("sp").vocab_size()


def random_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, n)


def make_data(root: Path, vocab: int, train_shards: tuple[int, ...] = (8 * STEP_TOKENS,)) -> Path:
    """A val shard of 64 sequences + 1 token and train shards of the given lengths, random tokens."""
    data = root / "data"
    data.mkdir()
    write_shard(data / "fineweb_val_000000.bin", random_tokens(64 * SEQ_LEN + 1, vocab))
    for i, n in enumerate(train_shards):
        write_shard(data / f"fineweb_train_{i:06d}.bin", random_tokens(n, vocab, seed=1 + i))
    return data


def tiny(data: Path, tokenizer: tuple[Path, int], **overrides) -> dict:
    cfg = dict(DATA_PATH=data, TOKENIZER_PATH=tokenizer[0], VOCAB_SIZE=tokenizer[1], RUN_ID="run", NUM_LAYERS=2,
               MODEL_DIM=64, NUM_HEADS=2, NUM_KV_HEADS=1, TRAIN_SEQ_LEN=SEQ_LEN, TRAIN_BATCH_TOKENS=BATCH_TOKENS,
               VAL_BATCH_SIZE=BATCH_TOKENS, ITERATIONS=5, WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=1,
               MAX_WALLCLOCK_SECONDS=0, TORCH_COMPILE=0)
    cfg.update(overrides)
    return cfg


def launch(cwd: Path, settings: dict, script: Path = REPO / "train_gpt.py", nproc: int = 1) -> subprocess.CompletedProcess:
    """Run `script` (under torch.distributed.run when nproc > 1) in `cwd`; fail the test if it hangs."""
    cmd = [sys.executable, str(script)] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    with subprocess.Popen(cmd, cwd=cwd, env=clean_env(**settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
            stdout, stderr = proc.communicate()
            pytest.fail(f"{' '.join(cmd)} still running after {TIMEOUT}s\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.fixture
def cwd(tmp_path) -> Path:
    """An empty working directory for one run; its data lives beside it, in tmp_path/data."""
    path = tmp_path / "run"
    path.mkdir()
    return path


def outputs(cwd: Path) -> list[str]:
    return sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))


def assert_one_line_error(proc: subprocess.CompletedProcess, cwd: Path, *fragments: str):
    assert proc.returncode == 2, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("train_gpt.py: error: ")
    for fragment in fragments:
        assert fragment in line
    assert proc.stdout == "" and outputs(cwd) == []  # no logs/, no final_model.*


# ----------------------------------------------------------------------------- 1. configuration

def numeric_and_choice_settings() -> list[str]:
    """Every setting Hyperparameters reads through env()/flag(), taken from the source."""
    return sorted(set(re.findall(r'\b(?:env|flag)\(\s*"([A-Z0-9_]+)"', (REPO / "train_gpt.py").read_text(encoding="utf-8"))))


def test_every_typed_setting_rejects_a_malformed_value_naming_it(hparams):
    names = numeric_and_choice_settings()
    assert {"NUM_HEADS", "TRAIN_BATCH_TOKENS", "WORLD_SIZE", "COMPRESSOR", "MAX_WALLCLOCK_SECONDS"} <= set(names)
    for name in names:
        with pytest.raises(ValueError, match=rf"^{name}='x' is invalid: expected \S"):
            hparams(**{name: "x"})


OUT_OF_RANGE = [
    (dict(MODEL_DIM=-64), "MODEL_DIM='-64' is invalid: expected a positive int"),
    (dict(TRAIN_SEQ_LEN=0), "TRAIN_SEQ_LEN='0' is invalid: expected a positive int"),
    (dict(VAL_LOSS_EVERY=-1), "VAL_LOSS_EVERY='-1' is invalid: expected an int >= 0 (0 = only at the end)"),
    (dict(TIE_EMBEDDINGS=2), "TIE_EMBEDDINGS='2' is invalid: expected 0 or 1"),
    (dict(BETA2=1.0), "BETA2='1.0' is invalid: expected a number in [0, 1)"),
    (dict(COMPRESSOR="lzma"), "COMPRESSOR='lzma' is invalid: expected zlib or zstd"),
    (dict(WORLD_SIZE=3, RANK=0), "WORLD_SIZE='3' is invalid: expected 1, 2, 4 or 8 (it must divide 8)"),
    (dict(WORLD_SIZE=2, RANK=2), "RANK='2' is invalid: expected 0..1"),
    (dict(MODEL_DIM=96, NUM_HEADS=5), "MODEL_DIM=96 is invalid: it must be divisible by NUM_HEADS=5"),
    (dict(MODEL_DIM=96, NUM_HEADS=32), "MODEL_DIM/NUM_HEADS=3 is invalid: RoPE needs an even head dim"),
    (dict(NUM_HEADS=8, NUM_KV_HEADS=3), "NUM_KV_HEADS=3 is invalid: it must divide NUM_HEADS=8"),
    (dict(WORLD_SIZE=2, RANK=0, TRAIN_SEQ_LEN=1024, TRAIN_BATCH_TOKENS=4096),
     "TRAIN_BATCH_TOKENS=4096 is invalid: it must be a multiple of WORLD_SIZE*grad_accum*TRAIN_SEQ_LEN=8192"),
    (dict(TRAIN_SEQ_LEN=1024, TRAIN_BATCH_TOKENS=8192, VAL_BATCH_SIZE=4096),
     "VAL_BATCH_SIZE=4096 is invalid: it must be at least 8*TRAIN_SEQ_LEN=8192"),
    (dict(TOKENIZER_PATH="tok.json"), "TOKENIZER_PATH='tok.json' is invalid: expected a sentencepiece .model file"),
]


@pytest.mark.parametrize("settings, message", OUT_OF_RANGE, ids=[m.split(" ")[0] for _, m in OUT_OF_RANGE])
def test_out_of_range_setting_names_variable_value_and_what_is_valid(hparams, settings, message):
    with pytest.raises(ValueError) as err:
        hparams(**settings)
    assert str(err.value) == message


@pytest.mark.parametrize("settings, fragments", [
    (dict(NUM_HEADS="x"), ["NUM_HEADS='x' is invalid: expected a positive int"]),
    (dict(NUM_KV_HEADS=3, NUM_HEADS=2), ["NUM_KV_HEADS=3 is invalid: it must divide NUM_HEADS=2"]),
    (dict(HYMBA_CONV=4), ["HYMBA_CONV set but HYMBA_LAYERS is empty"]),
], ids=["non_numeric", "kv_heads_not_dividing_heads", "hymba_setting_without_layers"])
def test_bad_config_prints_one_line_exits_2_and_writes_nothing(tmp_path, cwd, tokenizer, settings, fragments):
    proc = launch(cwd, tiny(make_data(tmp_path, tokenizer[1]), tokenizer, **settings))
    assert_one_line_error(proc, cwd, *fragments)


@pytest.mark.parametrize("settings, named", [
    (dict(HYMBA_LAYERS="x"), "HYMBA_LAYERS='x'"),
    (dict(HYMBA_LAYERS="5"), "HYMBA_LAYERS='5'"),  # NUM_LAYERS=2
    (dict(HYMBA_LAYERS="1", HYMBA_CONV="-1"), "HYMBA_CONV='-1'"),
    (dict(HYMBA_LAYERS="1", HYMBA_SSM_HEADS="3"), "HYMBA_SSM_HEADS='3'"),
], ids=["non_numeric", "no_such_block", "bad_conv_taps", "ssm_heads_not_whole_kv_groups"])
def test_bad_hymba_setting_prints_one_line_naming_it(tmp_path, cwd, tokenizer, settings, named):
    proc = launch(cwd, tiny(make_data(tmp_path, tokenizer[1]), tokenizer, NUM_HEADS=4, NUM_KV_HEADS=2, **settings))
    assert_one_line_error(proc, cwd, named, "is invalid: expected")


def test_bad_config_under_torchrun_fails_every_rank_and_keeps_the_error_file(tmp_path, cwd, tokenizer):
    proc = launch(cwd, tiny(make_data(tmp_path, tokenizer[1]), tokenizer, NUM_HEADS="x"), nproc=2)
    assert proc.returncode != 0
    assert proc.stderr.count("train_gpt.py: error: NUM_HEADS='x' is invalid: expected a positive int") == 2  # once per rank
    assert "ValueError: NUM_HEADS='x' is invalid" in proc.stderr  # torchrun's summary, read from @record's error file
    assert outputs(cwd) == []


# ----------------------------------------------------------------------------- 2. data

def break_data(data: Path, tokenizer: tuple[Path, int], fault: str) -> tuple[dict, list[str]]:
    """Damage a good dataset one way; return the settings to run it and what the error line must name."""
    val, train = data / "fineweb_val_000000.bin", data / "fineweb_train_000000.bin"
    vocab = tokenizer[1]
    hint = "tools/make_dataset.py"
    if fault == "no_shards":
        for f in data.iterdir():
            f.unlink()
        return {}, [f"no shards match {data}/fineweb_train_*.bin", hint]
    if fault == "no_val_shards":
        val.unlink()
        return {}, [f"no shards match {data}/fineweb_val_*.bin", hint]
    if fault == "bad_magic":
        write_shard(val, random_tokens(100, vocab), magic=20240521)
        return {}, [f"{val}: not a challenge shard", hint]
    if fault == "truncated":
        train.write_bytes(train.read_bytes()[:-2])
        return {}, [f"{train}: size", "does not match its header", hint]
    if fault == "val_token_too_big":
        write_shard(val, np.append(random_tokens(64 * SEQ_LEN, vocab), vocab))
        return {}, [f"{val}: token id {vocab} >= VOCAB_SIZE={vocab}", hint]
    if fault == "train_token_too_big":
        write_shard(train, np.append(random_tokens(8 * STEP_TOKENS, vocab), vocab))
        return {}, [f"{train}: token id {vocab} >= VOCAB_SIZE={vocab}", hint]
    if fault == "no_tokenizer":
        missing = data / "fineweb_1024_bpe.model"
        return dict(TOKENIZER_PATH=missing), [f"TOKENIZER_PATH='{missing}' does not exist", hint]
    assert fault == "tokenizer_vocab_mismatch"  # shards and tokenizer agree, VOCAB_SIZE does not
    return dict(VOCAB_SIZE=2 * vocab), [f"{tokenizer[0]}: vocab size {vocab} != VOCAB_SIZE={2 * vocab}", "use the tokenizer the shards were made with"]


@pytest.mark.parametrize("fault", ["no_shards", "no_val_shards", "bad_magic", "truncated", "val_token_too_big",
                                   "train_token_too_big", "no_tokenizer", "tokenizer_vocab_mismatch"])
def test_bad_data_stops_before_training_naming_the_file_and_the_fix(tmp_path, cwd, tokenizer, fault):
    data = make_data(tmp_path, tokenizer[1])
    overrides, fragments = break_data(data, tokenizer, fault)
    assert_one_line_error(launch(cwd, tiny(data, tokenizer, **overrides)), cwd, *fragments)


def test_bad_token_in_a_later_train_shard_stops_when_that_shard_loads(tmp_path, cwd, tokenizer):
    vocab = tokenizer[1]
    data = make_data(tmp_path, vocab, train_shards=(STEP_TOKENS + 100, 8 * STEP_TOKENS))  # shard 1 loads during step 2
    bad = data / "fineweb_train_000001.bin"
    write_shard(bad, np.append(random_tokens(8 * STEP_TOKENS, vocab), vocab))
    proc = launch(cwd, tiny(data, tokenizer))
    assert proc.returncode == 1
    assert f"ValueError: {bad}: token id {vocab} >= VOCAB_SIZE={vocab}" in proc.stderr  # mid-training: traceback kept
    assert "Traceback" in proc.stderr
    log = (cwd / "logs" / "run.txt").read_text(encoding="utf-8")
    assert len(grab(r"^step:1/5 train_loss:{n} ", log)) == 1 and not grab(r"^step:2/5 train_loss:{n} ", log)
    assert outputs(cwd) == ["logs", "logs/run.txt"]


# ----------------------------------------------------------------------------- 3. during training

def test_non_finite_loss_stops_at_its_step_with_the_last_finite_loss(tmp_path, cwd, tokenizer):
    proc = launch(cwd, tiny(make_data(tmp_path, tokenizer[1]), tokenizer), script=FAULTS / "nan_loss.py")
    assert proc.returncode == 1
    assert "NonFiniteLoss: non-finite training loss at step 3" in proc.stderr
    log = (cwd / "logs" / "run.txt").read_text(encoding="utf-8")
    [(step2_loss,)] = grab(r"^step:2/5 train_loss:{n} ", log)
    [(last_good,)] = grab(r"^step:3/5 train_loss:nan non-finite on some rank; stopping\. last finite train_loss:{n} at step:2$", log)
    assert last_good == step2_loss
    assert log.rstrip().endswith("at step:2")  # nothing ran after it
    assert outputs(cwd) == ["logs", "logs/run.txt"]


def test_wallclock_cap_on_one_rank_stops_both_at_the_same_step(tmp_path, cwd, tokenizer):
    """Rank 0 alone has a 2 s cap; the per-step all-reduced flag must stop rank 1 at the same step."""
    settings = tiny(make_data(tmp_path, tokenizer[1]), tokenizer, ITERATIONS=100_000, MAX_WALLCLOCK_SECONDS=2, WARMDOWN_ITERS=0, TRAIN_LOG_EVERY=1000)
    proc = launch(cwd, settings, script=FAULTS / "cap_on_rank0_only.py", nproc=2)
    assert proc.returncode == 0, proc.stderr
    steps = {int(r): int(n) for r, n in re.findall(r"^rank:(\d) steps:(\d+)$", proc.stdout, flags=re.M)}
    log = (cwd / "logs" / "run.txt").read_text(encoding="utf-8")
    [(train_ms, stop_step)] = grab(r"^stopping_early: wallclock_cap train_time:(\d+)ms step:(\d+)/100000$", log)
    assert train_ms >= 2000 and 1 <= stop_step < 100_000
    assert steps == {0: stop_step, 1: stop_step}


# ----------------------------------------------------------------------------- 4. outputs

def test_export_interrupted_before_rename_leaves_no_ptz_and_no_temp_file(tmp_path, cwd, tokenizer):
    proc = launch(cwd, tiny(make_data(tmp_path, tokenizer[1]), tokenizer), script=FAULTS / "ptz_rename_fails.py")
    assert proc.returncode == 1 and "injected fault: rename of the .ptz failed" in proc.stderr
    assert outputs(cwd) == ["final_model.pt", "logs", "logs/run.txt"]  # the .pt before it was renamed whole


@pytest.mark.parametrize("allow", [0, 1])
def test_artifact_over_budget_is_reported_and_fails_unless_allowed(tmp_path, cwd, tokenizer, allow):
    proc = launch(cwd, tiny(make_data(tmp_path, tokenizer[1]), tokenizer, ALLOW_OVER_BUDGET=allow), script=FAULTS / "tiny_budget.py")
    assert proc.returncode == (0 if allow else 3), proc.stderr
    total = (cwd / "final_model.int8.ptz").stat().st_size + len((REPO / "train_gpt.py").read_bytes())
    line = f"artifact_over_budget: {total} bytes > 1000 (ALLOW_OVER_BUDGET={allow})"
    assert proc.stdout.rstrip().endswith(line)
    assert (cwd / "logs" / "run.txt").read_text(encoding="utf-8").rstrip().endswith(line)


# ----------------------------------------------------------------------------- 5. distributed

@pytest.mark.parametrize("fault_at", ["train", "eval"])
def test_failing_rank_brings_the_job_down_showing_its_error(tmp_path, cwd, tokenizer, fault_at):
    start = time.monotonic()
    proc = launch(cwd, tiny(make_data(tmp_path, tokenizer[1]), tokenizer, FAULT_AT=fault_at), script=FAULTS / "rank1_raises.py", nproc=2)
    assert proc.returncode != 0 and time.monotonic() - start < TIMEOUT
    assert "RuntimeError: injected fault on rank 1" in proc.stderr
    assert not list(cwd.glob("final_model.*"))
