"""hymba_layer.py in the PR #1493 record script (../shared/hosts/): self-extracting, FlashAttention 3, partial
RoPE, XSA, depth recurrence, parallel residuals, EMA, GPTQ int6 export, sliding-window scoring and TTT.
Patched by tools/patch_host.py and run end to end on the CPU (FA3 -> SDPA and CUDA -> CPU in the test
copy only), with a hybrid layer inside the looped blocks."""
import collections
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from conftest import TOKENIZERS, corpus_docs, grab, write_shard
from hosts import host_env, patch_host, write_script

# 4 blocks x 256 (4 heads of 64, 2 KV heads, RoPE on 16 dims), blocks 1-2 looped twice from 30% of training,
# XSA on every block, parallel residuals from block 3; 2 x 1024 tokens per step (8 micro-steps of 2 x 128)
TINY = dict(RUN_ID="run", SEED=1337, VOCAB_SIZE=8192, NUM_LAYERS=4, MODEL_DIM=256, EMBEDDING_DIM=256, NUM_HEADS=4,
            NUM_KV_HEADS=2, MLP_MULT=4, TRAIN_SEQ_LEN=128, ROPE_TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=128, EVAL_STRIDE=64,
            TRAIN_BATCH_TOKENS=2048, VAL_BATCH_TOKENS=16384, ITERATIONS=6, WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=1,
            MAX_WALLCLOCK_SECONDS=0, NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, ENABLE_LOOPING_AT=0.3, PARALLEL_RESIDUAL_START=3,
            XSA_LAST_N=4, ROPE_DIMS=16, GPTQ_CALIBRATION_BATCHES=2, GPTQ_RESERVE_SECONDS=0, COMPRESSOR="lzma",
            TTT_CHUNK_TOKENS=4096, TTT_EPOCHS=1)
SCORES = ("pre-quantization post-ema", "quantized", "quantized_sliding_window", "quantized_ttt")
DYNAMICS = tuple(f"hymba.{n}" for n in ("dt_weight", "A_log", "dt_bias", "D", "conv_weight"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """DATA_DIR as PR #1493 reads it: datasets/fineweb10B_sp8192/ and tokenizers/fineweb_8192_bpe.model,
    the corpus tokenized with the challenge's real sp8192 model (skip without it)."""
    model = TOKENIZERS / "fineweb_8192_bpe.model"
    if not model.is_file():
        pytest.skip(f"{model} not present")
    root = tmp_path_factory.mktemp("data8192")
    (root / "tokenizers").mkdir()
    shutil.copy(model, root / "tokenizers" / "fineweb_8192_bpe.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    docs = corpus_docs()
    stream = lambda part: np.concatenate([[1] + sp.encode(d) for d in part])
    shards = root / "datasets" / "fineweb10B_sp8192"
    shards.mkdir(parents=True)
    write_shard(shards / "fineweb_val_000000.bin", stream(docs[:4])[:12_289])  # 96 sequences of 128 for evaluation
    write_shard(shards / "fineweb_train_000000.bin", stream(docs[4:]))
    return root


def run(folder, patched: bool, **settings) -> str:
    script = write_script(folder / "train_gpt.py", "pr1493", patched)
    proc = subprocess.run([sys.executable, str(script)], cwd=folder, env=host_env(**settings), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, data_dir):
    """The patched script with block 1 (inside the loop) hybrid, conv taps on, TTT and sliding-window scoring on."""
    folder = tmp_path_factory.mktemp("hybrid")
    return folder, run(folder, True, **TINY, DATA_DIR=f"{data_dir}/", TTT_ENABLED=1, HYMBA_LAYERS=1, HYMBA_CONV=2)


def test_patched_script_is_self_extracting_and_runs_a_hybrid_layer_in_a_looped_block(hybrid):
    folder, out = hybrid
    text = (folder / "train_gpt.py").read_text(encoding="utf-8")
    assert text.startswith("import lzma as L,base64 as B\nexec(L.decompress(B.b85decode(\"") and len(text.splitlines()) == 2
    assert re.findall(r"^hymba:layer (\d) attn_heads:2 ssm_heads:2 kv_heads:2 head_dim:64 ", out, re.M) == ["1"] * 3  # the training model and each deserialize() (quantized eval, TTT)
    assert re.search(r"^layer_loop:enabled step:\d+ .*encoder:\[0, 1, 2\] decoder:\[1, 2, 3\]", out, re.M)  # block 1 runs twice
    scores = {label: bpb for label, bpb in re.findall(r"^(.+?) val_loss:[\d.]+ val_bpb:([\d.]+) eval_time:", out, re.M)}
    assert set(SCORES) <= set(scores) and all(0 < float(scores[s]) < 8 for s in SCORES)
    [(code_bytes,)] = grab(r"^Code size: {n} bytes", out)
    assert code_bytes == len(text.encode("utf-8"))  # the counted wrapper holds the module


def test_every_parameter_is_in_exactly_one_optimizer(hybrid):
    groups = json.loads((hybrid[0] / "optimizer_groups.json").read_text())
    tok, muon, scalar = groups["optimizers"]  # tied embeddings: token AdamW, Muon, scalar AdamW
    counts = collections.Counter(n for g in groups["optimizers"] for n in g)
    assert set(counts) == set(groups["params"]) and set(counts.values()) == {1}
    hybrid_params = [n for n in groups["params"] if n.startswith("blocks.1.attn.")]
    assert len(hybrid_params) == 10  # the host's c_q c_k c_v proj q_gain, and the five dynamics
    for n in hybrid_params:
        assert n in (scalar if n.endswith(("q_gain", *DYNAMICS)) else muon), n


def test_gptq_keeps_its_routes_and_ships_the_dynamics_as_fp16(hybrid):
    """The hybrid layer adds no tensor GPTQ needs a Hessian for: the dynamics pass through as fp16."""
    out = hybrid[1]
    categories = dict(re.findall(r"^  (gptq \(int\d\)|passthrough \(float16\)): (.+)$", out, re.M))
    gptq = categories["gptq (int6)"].split(", ")
    assert not [n for n in gptq if "hymba" in n]
    assert {f"blocks.attn.{n}" for n in DYNAMICS} <= set(categories["passthrough (float16)"].split(", "))
    [(hessians,)] = grab(r"^GPTQ:collected {n} Hessians", out)
    assert hessians >= len(gptq)


def test_patched_script_without_hymba_trains_exactly_like_the_original(tmp_path_factory, data_dir):
    short = {**TINY, "ITERATIONS": 3, "MODEL_DIM": 128, "EMBEDDING_DIM": 128, "DATA_DIR": f"{data_dir}/", "SLIDING_WINDOW_ENABLED": 0}
    original = run(tmp_path_factory.mktemp("original"), False, **short)
    patched = run(tmp_path_factory.mktemp("patched"), True, **short)
    losses = lambda out: re.findall(r"^\d+/3 train_loss: [\d.]+", out, re.M)
    assert len(losses(original)) == 3 and losses(patched) == losses(original)
    final = lambda out: re.search(r"^quantized val_loss:\S+ val_bpb:\S+", out, re.M).group(0)
    assert final(patched) == final(original)
    assert "hymba:" not in patched and patch_host.BEGIN not in original
