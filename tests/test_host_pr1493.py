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
# XSA on every block, parallel residuals from block 3; 2 x 1024 tokens per step (8 micro-steps of 2 x 128);
# EMA 0.5 so that 6 steps show in the post-EMA model that every score reads; TTT and sliding-window scoring on
TINY = dict(RUN_ID="run", SEED=1337, VOCAB_SIZE=8192, NUM_LAYERS=4, MODEL_DIM=256, EMBEDDING_DIM=256, NUM_HEADS=4,
            NUM_KV_HEADS=2, MLP_MULT=4, TRAIN_SEQ_LEN=128, ROPE_TRAIN_SEQ_LEN=128, EVAL_SEQ_LEN=128, EVAL_STRIDE=64,
            TRAIN_BATCH_TOKENS=2048, VAL_BATCH_TOKENS=16384, ITERATIONS=6, WARMUP_STEPS=0, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=1,
            MAX_WALLCLOCK_SECONDS=0, NUM_LOOPS=1, LOOP_START=1, LOOP_END=2, ENABLE_LOOPING_AT=0.3, PARALLEL_RESIDUAL_START=3,
            XSA_LAST_N=4, ROPE_DIMS=16, GPTQ_CALIBRATION_BATCHES=2, GPTQ_RESERVE_SECONDS=0, COMPRESSOR="lzma",
            TTT_CHUNK_TOKENS=4096, TTT_EPOCHS=1, EMA_DECAY=0.5, TTT_ENABLED=1)
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
def plain(tmp_path_factory, data_dir):
    """The original script, unpatched, at the same settings: what the hybrid run is compared with."""
    return run(tmp_path_factory.mktemp("plain"), False, **TINY, DATA_DIR=f"{data_dir}/")


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, data_dir):
    """The patched script with block 1 (inside the loop) hybrid, conv taps on."""
    folder = tmp_path_factory.mktemp("hybrid")
    return folder, run(folder, True, **TINY, DATA_DIR=f"{data_dir}/", HYMBA_LAYERS=1, HYMBA_CONV=2)


def train_losses(out: str) -> dict[int, float]:
    return {int(step): loss for step, loss in grab(r"^(\d+)/6 train_loss: {n} ", out)}


def scores(out: str) -> dict[str, float]:
    """label -> val_bpb of every final score line."""
    return {label: float(bpb) for label, bpb in re.findall(r"^(.+?) val_loss:[\d.]+ val_bpb:([\d.]+) eval_time:", out, re.M)}


def test_patched_script_is_self_extracting_and_runs_a_hybrid_layer_in_a_looped_block(hybrid):
    folder, out = hybrid
    text = (folder / "train_gpt.py").read_text(encoding="utf-8")
    assert text.startswith("import lzma as L,base64 as B\nexec(L.decompress(B.b85decode(\"") and len(text.splitlines()) == 2
    assert re.findall(r"^hymba:layer (\d) attn_heads:2 ssm_heads:2 kv_heads:2 head_dim:64 ", out, re.M) == ["1"] * 3  # the training model and each deserialize() (quantized eval, TTT)
    assert re.search(r"^layer_loop:enabled step:\d+ .*encoder:\[0, 1, 2\] decoder:\[1, 2, 3\]", out, re.M)  # block 1 runs twice
    assert set(SCORES) <= set(scores(out))
    [(code_bytes,)] = grab(r"^Code size: {n} bytes", out)
    assert code_bytes == len(text.encode("utf-8"))  # the counted wrapper holds the module


def test_hybrid_learns_and_scores_like_the_plain_script(hybrid, plain):
    """Same data, seed and steps as the unpatched script: the loss drop within 2% of plain's and every score
    within 0.005 bpb of plain's, either way. In 6 steps a hybrid layer behind the host's zero-init output
    projection moves little; SSM heads 100x too loud train faster (drop 1.23x, scores 0.05-0.09 lower)."""
    hybrid_losses, plain_losses = train_losses(hybrid[1]), train_losses(plain)
    drop = lambda losses: losses[1] - losses[6]
    assert sorted(hybrid_losses) == sorted(plain_losses) == list(range(1, 7))
    assert 0.98 < drop(hybrid_losses) / drop(plain_losses) < 1.02, (hybrid_losses, plain_losses)  # measured: 1.4603 / 1.4625
    hybrid_scores, plain_scores = scores(hybrid[1]), scores(plain)
    assert {s: round(hybrid_scores[s] - plain_scores[s], 4) for s in SCORES if not abs(hybrid_scores[s] - plain_scores[s]) < 0.005} == {}
    # measured (hybrid - plain): +0.0001 pre-quantization, +0.0011 quantized, +0.0012 sliding window, +0.0012 TTT


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


def test_patched_script_without_hymba_trains_exactly_like_the_original(tmp_path_factory, data_dir, plain):
    patched = run(tmp_path_factory.mktemp("patched"), True, **TINY, DATA_DIR=f"{data_dir}/")
    losses = lambda out: re.findall(r"^\d+/6 train_loss: [\d.]+", out, re.M)
    assert len(losses(plain)) == 6 and losses(patched) == losses(plain)
    final = lambda out: re.findall(r"^.+ val_loss: ?\S+ val_bpb: ?\S+", out, re.M)
    assert len(final(plain)) == len(SCORES) + 1 and final(patched) == final(plain)  # the step-6 line and every score
    assert "hymba:" not in patched and patch_host.BEGIN not in plain
