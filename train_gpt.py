"""Parameter Golf host trainer: challenge shards -> GPT -> Muon/Adam -> int8 export -> roundtrip val_bpb.

Runs on 8xH100 (`torchrun --standalone --nproc_per_node=8 train_gpt.py`, bf16, torch.compile) and on
CPU (tests, demo). Every setting is an env var (see Hyperparameters). With HYMBA_LAYERS set, the
chosen attention layers are swapped for hybrid attention+SSM layers from hymba_layer.py.
"""
from __future__ import annotations

import copy
import gc
import glob
import io
import math
import os
import random
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP

try:  # hybrid attention + SSM heads (HYMBA_LAYERS); without hymba_layer.py every head is attention
    from hymba_layer import hymba_attention
except ImportError:
    def hymba_attention(layer, kernel, *args, **kwargs):
        return kernel(*args, **kwargs)

# ----------------------------------------------------------------------------- hyperparameters

# substrings of parameter names kept fp32, trained by Adam and exported unquantized (the challenge's
# CONTROL_TENSOR_NAME_PATTERNS); hymba_layer.py appends the names of its SSM dynamics tensors
CONTROL_TENSOR_NAME_PATTERNS = tuple(p for p in os.environ.get(
    "CONTROL_TENSOR_NAME_PATTERNS", "attn_scale,attn_scales,mlp_scale,mlp_scales,resid_mix,resid_mixes,q_gain,skip_weight,skip_weights").split(",") if p)
ARTIFACT_LIMIT_BYTES = 16_000_000


def env(name: str, default, kind=int, ok=lambda v: True, valid: str = ""):
    """Read one env var as `kind`; a bad value stops the run naming the variable and what is valid."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise ValueError(f"{name}={raw!r} is invalid: expected {valid or kind.__name__}")
    return value


def positive(kind=int):
    return dict(kind=kind, ok=lambda v: v > 0, valid=f"a positive {kind.__name__}")


def flag(name: str, default: bool) -> bool:
    return bool(env(name, int(default), ok=lambda v: v in (0, 1), valid="0 or 1"))


class Hyperparameters:
    """Every env var the challenge's root trainer reads (same names and defaults), plus COMPRESSOR,
    TORCH_COMPILE, ALLOW_OVER_BUDGET and DATA_DIR. Constructing it validates all of them."""

    def __init__(self):
        self.vocab_size = env("VOCAB_SIZE", 1024, **positive())
        data_dir = os.environ.get("DATA_DIR", "./data")
        self.data_path = os.environ.get("DATA_PATH", f"{data_dir}/datasets/fineweb10B_sp{self.vocab_size}")
        self.tokenizer_path = os.environ.get("TOKENIZER_PATH", f"{data_dir}/tokenizers/fineweb_{self.vocab_size}_bpe.model")
        self.train_files = os.path.join(self.data_path, "fineweb_train_*.bin")
        self.val_files = os.path.join(self.data_path, "fineweb_val_*.bin")
        self.run_id = os.environ.get("RUN_ID", str(uuid.uuid4()))
        self.seed = env("SEED", 1337)
        # evaluation and logging
        self.val_batch_size = env("VAL_BATCH_SIZE", 524_288, **positive())
        self.val_loss_every = env("VAL_LOSS_EVERY", 1000, ok=lambda v: v >= 0, valid="an int >= 0 (0 = only at the end)")
        self.train_log_every = env("TRAIN_LOG_EVERY", 200, **positive())
        self.eval_carry_state = flag("EVAL_CARRY_STATE", False)  # also score with the hybrid layers' state carried (eval_val_carried)
        # length of training
        self.iterations = env("ITERATIONS", 20_000, **positive())
        self.warmdown_iters = env("WARMDOWN_ITERS", 1200, ok=lambda v: v >= 0, valid="an int >= 0")
        self.warmup_steps = env("WARMUP_STEPS", 20, ok=lambda v: v >= 0, valid="an int >= 0")
        self.train_batch_tokens = env("TRAIN_BATCH_TOKENS", 524_288, **positive())
        self.train_seq_len = env("TRAIN_SEQ_LEN", 1024, **positive())
        self.max_wallclock_seconds = env("MAX_WALLCLOCK_SECONDS", 600.0, float, valid="a number of seconds (<= 0 disables the cap)")
        # model shape
        self.num_layers = env("NUM_LAYERS", 9, **positive())
        self.model_dim = env("MODEL_DIM", 512, **positive())
        self.num_heads = env("NUM_HEADS", 8, **positive())
        self.num_kv_heads = env("NUM_KV_HEADS", 4, **positive())
        self.mlp_mult = env("MLP_MULT", 2, **positive())
        self.tie_embeddings = flag("TIE_EMBEDDINGS", True)
        self.rope_base = env("ROPE_BASE", 10000.0, **positive(float))
        self.logit_softcap = env("LOGIT_SOFTCAP", 30.0, **positive(float))
        self.qk_gain_init = env("QK_GAIN_INIT", 1.5, float)
        # optimizer
        self.embed_lr = env("EMBED_LR", 0.6, float)
        self.head_lr = env("HEAD_LR", 0.008, float)
        self.tied_embed_lr = env("TIED_EMBED_LR", 0.05, float)
        self.tied_embed_init_std = env("TIED_EMBED_INIT_STD", 0.005, **positive(float))
        self.matrix_lr = env("MATRIX_LR", 0.04, float)
        self.scalar_lr = env("SCALAR_LR", 0.04, float)
        self.muon_momentum = env("MUON_MOMENTUM", 0.95, float, ok=lambda v: 0 <= v < 1, valid="a number in [0, 1)")
        self.muon_backend_steps = env("MUON_BACKEND_STEPS", 5, **positive())
        self.muon_momentum_warmup_start = env("MUON_MOMENTUM_WARMUP_START", 0.85, float, ok=lambda v: 0 <= v < 1, valid="a number in [0, 1)")
        self.muon_momentum_warmup_steps = env("MUON_MOMENTUM_WARMUP_STEPS", 500, ok=lambda v: v >= 0, valid="an int >= 0")
        self.beta1 = env("BETA1", 0.9, float, ok=lambda v: 0 <= v < 1, valid="a number in [0, 1)")
        self.beta2 = env("BETA2", 0.95, float, ok=lambda v: 0 <= v < 1, valid="a number in [0, 1)")
        self.adam_eps = env("ADAM_EPS", 1e-8, **positive(float))
        self.grad_clip_norm = env("GRAD_CLIP_NORM", 0.0, float, ok=lambda v: v >= 0, valid="a number >= 0 (0 = off)")
        # export and runtime
        self.compressor = env("COMPRESSOR", "zlib", str, ok=lambda v: v in ("zlib", "zstd"), valid="zlib or zstd")
        self.torch_compile = flag("TORCH_COMPILE", torch.cuda.is_available())
        self.allow_over_budget = flag("ALLOW_OVER_BUDGET", False)
        # distributed layout (torchrun sets these)
        self.distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.world_size = env("WORLD_SIZE", 1, ok=lambda v: v > 0 and 8 % v == 0, valid="1, 2, 4 or 8 (it must divide 8)")
        self.rank = env("RANK", 0, ok=lambda v: 0 <= v < self.world_size, valid=f"0..{self.world_size - 1}")
        self.local_rank = env("LOCAL_RANK", 0, ok=lambda v: v >= 0, valid="an int >= 0")
        self.grad_accum_steps = 8 // self.world_size
        self.check_shapes()

    def check_shapes(self):
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(msg)

        need(self.model_dim % self.num_heads == 0, f"MODEL_DIM={self.model_dim} is invalid: it must be divisible by NUM_HEADS={self.num_heads}")
        need((self.model_dim // self.num_heads) % 2 == 0, f"MODEL_DIM/NUM_HEADS={self.model_dim // self.num_heads} is invalid: RoPE needs an even head dim")
        need(not self.eval_carry_state or os.environ.get("HYMBA_LAYERS", "").strip(),
             "EVAL_CARRY_STATE=1 is invalid without HYMBA_LAYERS: it carries the hybrid layers' state from window to window")
        need(self.num_heads % self.num_kv_heads == 0, f"NUM_KV_HEADS={self.num_kv_heads} is invalid: it must divide NUM_HEADS={self.num_heads}")
        step_rows = self.world_size * self.grad_accum_steps * self.train_seq_len
        need(self.train_batch_tokens % step_rows == 0,
             f"TRAIN_BATCH_TOKENS={self.train_batch_tokens} is invalid: it must be a multiple of WORLD_SIZE*grad_accum*TRAIN_SEQ_LEN={step_rows}")
        need(self.val_batch_size // (self.world_size * self.grad_accum_steps) >= self.train_seq_len,
             f"VAL_BATCH_SIZE={self.val_batch_size} is invalid: it must be at least 8*TRAIN_SEQ_LEN={8 * self.train_seq_len}")
        need(self.tokenizer_path.endswith(".model"), f"TOKENIZER_PATH={self.tokenizer_path!r} is invalid: expected a sentencepiece .model file")


# ----------------------------------------------------------------------------- data

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
DATA_HINT = "build shards with `python tools/make_dataset.py` or fetch FineWeb with the challenge's data/cached_challenge_fineweb.py"


def read_shard_header(path: str) -> int:
    """Check a shard's header and exact size; return its token count."""
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header.size != HEADER_INTS or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: not a challenge shard (expected a 256-int32 header with magic {SHARD_MAGIC}, version {SHARD_VERSION}); {DATA_HINT}")
    num_tokens = int(header[2])
    expected = HEADER_INTS * 4 + 2 * num_tokens
    if os.path.getsize(path) != expected:
        raise ValueError(f"{path}: size {os.path.getsize(path)} bytes does not match its header ({num_tokens} tokens = {expected} bytes); the file is truncated or corrupt, {DATA_HINT}")
    return num_tokens


def load_data_shard(path: str, vocab_size: int) -> Tensor:
    num_tokens = read_shard_header(path)
    tokens = np.fromfile(path, dtype="<u2", count=num_tokens, offset=HEADER_INTS * 4)
    if num_tokens and int(tokens.max()) >= vocab_size:
        raise ValueError(f"{path}: token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}; the shard was made with another tokenizer, {DATA_HINT}")
    return torch.from_numpy(tokens.astype(np.int32))


def find_shards(pattern: str) -> list[str]:
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no shards match {pattern}; set DATA_PATH to a folder of fineweb_train_*.bin / fineweb_val_*.bin, {DATA_HINT}")
    for f in files:
        read_shard_header(f)
    return files


class TokenStream:
    """The train shards in order, wrapping around at the end; every rank reads the same stream."""

    def __init__(self, files: list[str], vocab_size: int):
        self.files, self.vocab_size, self.file_idx = files, vocab_size, 0
        self.tokens, self.pos = load_data_shard(files[0], vocab_size), 0

    def take(self, n: int) -> Tensor:
        chunks = []
        while n > 0:
            if self.pos >= self.tokens.numel():
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.tokens, self.pos = load_data_shard(self.files[self.file_idx], self.vocab_size), 0
            k = min(n, self.tokens.numel() - self.pos)
            chunks.append(self.tokens[self.pos : self.pos + k])
            self.pos, n = self.pos + k, n - k
        return torch.cat(chunks)


class DistributedTokenLoader:
    """Each call takes world_size contiguous spans of local_tokens+1 tokens; rank r keeps span r."""

    def __init__(self, files: list[str], vocab_size: int, rank: int, world_size: int, device: torch.device):
        self.stream, self.rank, self.world_size, self.device = TokenStream(files, vocab_size), rank, world_size, device

    def next_batch(self, global_tokens: int, seq_len: int, grad_accum_steps: int) -> tuple[Tensor, Tensor]:
        span = global_tokens // (self.world_size * grad_accum_steps) + 1
        chunk = self.stream.take(span * self.world_size)[self.rank * span : (self.rank + 1) * span].to(torch.int64)
        x, y = chunk[:-1].reshape(-1, seq_len), chunk[1:].reshape(-1, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def load_validation_tokens(pattern: str, seq_len: int, vocab_size: int) -> Tensor:
    tokens = torch.cat([load_data_shard(f, vocab_size) for f in find_shards(pattern)])
    usable = ((tokens.numel() - 1) // seq_len) * seq_len
    if usable <= 0:
        raise ValueError(f"validation shards {pattern} hold {tokens.numel()} tokens: need at least TRAIN_SEQ_LEN+1={seq_len + 1}")
    return tokens[: usable + 1].to(torch.int64)


def build_sentencepiece_luts(sp: spm.SentencePieceProcessor, vocab_size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per token id: UTF-8 bytes of its piece without the leading "▁", whether it has that "▁"
    (a space byte unless the previous token is a boundary), and whether it is a boundary
    (control/unknown/unused ids, which count 0 bytes)."""
    size = max(sp.vocab_size(), vocab_size)
    base_bytes = np.zeros(size, dtype=np.int16)
    has_leading_space = np.zeros(size, dtype=np.bool_)
    is_boundary = np.ones(size, dtype=np.bool_)
    for i in range(sp.vocab_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            has_leading_space[i], piece = True, piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return tuple(torch.tensor(a, device=device) for a in (base_bytes, has_leading_space, is_boundary))


def load_tokenizer(args: Hyperparameters) -> spm.SentencePieceProcessor:
    if not os.path.isfile(args.tokenizer_path):
        raise FileNotFoundError(f"TOKENIZER_PATH={args.tokenizer_path!r} does not exist; {DATA_HINT}")
    sp = spm.SentencePieceProcessor(model_file=args.tokenizer_path)
    if sp.vocab_size() != args.vocab_size:
        raise ValueError(f"{args.tokenizer_path}: vocab size {sp.vocab_size()} != VOCAB_SIZE={args.vocab_size}; use the tokenizer the shards were made with")
    return sp


# ----------------------------------------------------------------------------- model

class RMSNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.size(-1),))


class CastedLinear(nn.Linear):
    """fp32 master weight, cast to the activation dtype so matmuls run in bf16 under autocast."""

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class Rotary(nn.Module):
    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim), persistent=False)
        self._cache: tuple[int, torch.device, Tensor, Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device, dtype: torch.dtype, offset: int = 0) -> tuple[Tensor, Tensor]:
        """(cos, sin) of positions offset.., each (1, 1, seq_len, dim/2): the (batch, heads, seq, head_dim) layout."""
        if offset:  # scoring with state: positions run on across windows (fp64 angles: exact at any offset)
            freqs = torch.outer(torch.arange(offset, offset + seq_len, device=device, dtype=torch.float64), self.inv_freq.to(device, torch.float64))
            return freqs.cos()[None, None].to(dtype), freqs.sin()[None, None].to(dtype)
        if self._cache is None or self._cache[0] != seq_len or self._cache[1] != device:
            freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), self.inv_freq.to(device))
            self._cache = (seq_len, device, freqs.cos()[None, None], freqs.sin()[None, None])
        return self._cache[2].to(dtype), self._cache[3].to(dtype)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.c_q = CastedLinear(dim, dim, bias=False)
        self.c_k = CastedLinear(dim, num_kv_heads * self.head_dim, bias=False)
        self.c_v = CastedLinear(dim, num_kv_heads * self.head_dim, bias=False)
        self.proj = CastedLinear(dim, dim, bias=False)
        self.proj._zero_init = True  # the block starts as identity
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.head_dim, rope_base)
        self.pos_offset = 0  # position of the first token (eval_val_carried)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q = self.c_q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (batch, heads, seq, head_dim)
        k = self.c_k(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        cos, sin = self.rotary(t, x.device, q.dtype, self.pos_offset)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = hymba_attention(self, F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, mlp_mult: int):
        super().__init__()
        self.fc = CastedLinear(dim, mlp_mult * dim, bias=False)
        self.proj = CastedLinear(mlp_mult * dim, dim, bias=False)
        self.proj._zero_init = True

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(torch.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, mlp_mult: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(), RMSNorm()
        self.attn = CausalSelfAttention(dim, num_heads, num_kv_heads, rope_base, qk_gain_init)
        self.mlp = MLP(dim, mlp_mult)
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))  # mix of x and the embedding x0

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(self.attn_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """U-Net of blocks: the first half's outputs are added back (learned weights) into the second half."""

    def __init__(self, vocab_size: int, num_layers: int, model_dim: int, num_heads: int, num_kv_heads: int, mlp_mult: int,
                 tie_embeddings: bool, tied_embed_init_std: float, logit_softcap: float, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.logit_softcap = logit_softcap
        self.tok_emb = nn.Embedding(vocab_size, model_dim)
        self.num_encoder_layers = num_layers // 2
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder_layers, num_layers - self.num_encoder_layers), model_dim))
        self.blocks = nn.ModuleList(Block(model_dim, num_heads, num_kv_heads, mlp_mult, rope_base, qk_gain_init) for _ in range(num_layers))
        self.final_norm = RMSNorm()
        self.lm_head = None if tie_embeddings else CastedLinear(model_dim, vocab_size, bias=False)
        if self.lm_head is not None:
            self.lm_head._zero_init = True
        if tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, std=tied_embed_init_std)
        self.zero_init_marked()

    def zero_init_marked(self):
        for module in self.modules():
            if getattr(module, "_zero_init", False):
                nn.init.zeros_(module.weight)

    def forward(self, input_ids: Tensor, target_ids: Tensor) -> Tensor:
        x = F.rms_norm(self.tok_emb(input_ids), (self.tok_emb.embedding_dim,))
        x0, skips = x, []
        for i, block in enumerate(self.blocks):
            j = i - self.num_encoder_layers
            if 0 <= j < len(self.skip_weights) and skips:
                x = x + self.skip_weights[j].to(x.dtype) * skips.pop()
            x = block(x, x0)
            if i < self.num_encoder_layers:
                skips.append(x)
        x = self.final_norm(x)
        logits = F.linear(x, self.tok_emb.weight.to(x.dtype)) if self.lm_head is None else self.lm_head(x)
        logits = self.logit_softcap * torch.tanh(logits.float() / self.logit_softcap)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target_ids.reshape(-1))


def build_model(args: Hyperparameters, device: torch.device, log=print) -> tuple[GPT, list[str]]:
    """The GPT, with hybrid layers swapped in when HYMBA_LAYERS is set (their lines go to log); also the
    counted code files."""
    model = GPT(args.vocab_size, args.num_layers, args.model_dim, args.num_heads, args.num_kv_heads, args.mlp_mult,
                args.tie_embeddings, args.tied_embed_init_std, args.logit_softcap, args.rope_base, args.qk_gain_init)
    code_files = [__file__]
    if any(k.startswith("HYMBA_") and v.strip() for k, v in os.environ.items()):
        try:
            import hymba_layer
        except ImportError as e:
            raise ImportError(f"the HYMBA_* settings need hymba_layer.py beside train_gpt.py: {e}") from e
        if hymba_layer.build_and_swap_hymba_layers(model, log):
            code_files.append(hymba_layer.__file__)
    model = model.to(device)
    if device.type == "cuda":
        set_training_dtypes(model)
    return model, code_files


def set_training_dtypes(model: nn.Module) -> None:
    """bf16 for the embedding; fp32 master weights for CastedLinear matrices, vectors and control tensors."""
    model.bfloat16()
    for name, p in model.named_parameters():
        if p.ndim < 2 or is_control(name) or isinstance(owner(model, name), CastedLinear):
            p.data = p.data.float()


def owner(model: nn.Module, param_name: str) -> nn.Module:
    return model.get_submodule(param_name.rpartition(".")[0])


def is_control(name: str) -> bool:
    return any(p in name for p in CONTROL_TENSOR_NAME_PATTERNS)


# ----------------------------------------------------------------------------- optimizers

def newton_schulz_fp32(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float) -> Tensor:
    """torch.optim.Muon's orthogonalization (torch.optim._muon._zeropower_via_newtonschulz) in fp32 instead of bf16,
    for a CPU without bf16 matmul units, where bf16 is emulated and ~25x slower (RESULTS.md, "Muon on a CPU")."""
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.float().mT if tall else grad.float()
    x = x / x.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.mT
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def build_optimizers(model: GPT, args: Hyperparameters, device: torch.device) -> list[torch.optim.Optimizer]:
    """Muon for block matrices (orthogonalized in fp32 on a CPU without bf16 units); Adam for the embedding, an untied
    head, and vectors/control tensors."""
    if device.type == "cpu" and not torch.cpu._is_avx512_bf16_supported():
        torch.optim._muon._zeropower_via_newtonschulz = newton_schulz_fp32
    block_params = list(model.blocks.named_parameters())
    matrices = [p for n, p in block_params if p.ndim == 2 and not is_control(n)]
    scalars = [p for n, p in block_params if p.ndim != 2 or is_control(n)] + [model.skip_weights]
    adam = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, fused=device.type == "cuda")
    embed_lr = args.tied_embed_lr if args.tie_embeddings else args.embed_lr
    optimizers = [
        torch.optim.Adam([dict(params=[model.tok_emb.weight], lr=embed_lr, base_lr=embed_lr)], **adam),
        torch.optim.Muon([dict(params=matrices, lr=args.matrix_lr, base_lr=args.matrix_lr)], momentum=args.muon_momentum,
                         nesterov=True, ns_steps=args.muon_backend_steps, weight_decay=0.0, adjust_lr_fn="original"),
        torch.optim.Adam([dict(params=scalars, lr=args.scalar_lr, base_lr=args.scalar_lr)], **adam),
    ]
    if model.lm_head is not None:
        optimizers.append(torch.optim.Adam([dict(params=[model.lm_head.weight], lr=args.head_lr, base_lr=args.head_lr)], **adam))
    return optimizers


# ----------------------------------------------------------------------------- scoring

def target_bytes(x: Tensor, y: Tensor, luts: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """UTF-8 bytes of each target y after input x: its piece, plus the space a leading "▁" stands for."""
    base_bytes, has_leading_space, is_boundary = luts
    return base_bytes[y] + (has_leading_space[y] & ~is_boundary[x])


def eval_val(args: Hyperparameters, model: nn.Module, device: torch.device, val_tokens: Tensor,
             luts: tuple[Tensor, Tensor, Tensor]) -> tuple[float, float]:
    """(val_loss in nats/token, val_bpb) over every target once; sums in float64 across ranks."""
    seq_len = args.train_seq_len
    batch_seqs = args.val_batch_size // (args.world_size * args.grad_accum_steps) // seq_len
    total_seqs = (val_tokens.numel() - 1) // seq_len
    first, last = total_seqs * args.rank // args.world_size, total_seqs * (args.rank + 1) // args.world_size
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, targets, bytes
    model.eval()
    # no_grad, not inference_mode: caches built here (RoPE tables) are reused by training
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        for s in range(first, last, batch_seqs):
            e = min(s + batch_seqs, last)
            chunk = val_tokens[s * seq_len : e * seq_len + 1].to(device, non_blocking=True)
            x, y = chunk[:-1].reshape(-1, seq_len), chunk[1:].reshape(-1, seq_len)
            sums[0] += model(x, y).double() * y.numel()
            sums[1] += y.numel()
            sums[2] += target_bytes(x, y, luts).double().sum()
    model.train()
    if args.distributed:
        dist.all_reduce(sums)
    loss, targets, nbytes = sums.tolist()
    val_loss = loss / targets
    return val_loss, val_loss / math.log(2) * targets / nbytes


def eval_val_carried(args: Hyperparameters, model: GPT, device: torch.device, val_tokens: Tensor,
                     luts: tuple[Tensor, Tensor, Tensor], bos_id: int) -> tuple[float, float]:
    """As eval_val, but every hybrid layer keeps its SSM state (and window of keys/values) from one window to the
    next within a document (EVAL_CARRY_STATE=1): the stream is cut at document starts into rows, each scored in
    windows of TRAIN_SEQ_LEN tokens in order, so a token is scored with its whole document as SSM context. Every
    target once, causally; eager (positions change every window)."""
    import hymba_layer
    L, n = args.train_seq_len, val_tokens.numel() - 1  # n inputs, each predicting the next token
    rows = max(args.val_batch_size // (args.world_size * args.grad_accum_steps) // L, 1) * args.world_size  # eval_val's batch
    bos = (val_tokens[:n] == bos_id).nonzero().flatten()
    snap = lambda i: bos[min(torch.searchsorted(bos, i).item(), bos.numel() - 1)].item() if bos.numel() else i  # a document start at or after i
    cuts = sorted({0, n, *(min(snap(n * r // rows), n) for r in range(1, rows))})
    mine = list(zip(cuts, cuts[1:]))[args.rank :: args.world_size]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, targets, bytes
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            for w in range(max((math.ceil((b - a) / L) for a, b in mine), default=0)):
                x = torch.zeros(len(mine), L, dtype=torch.int64)
                y = torch.full((len(mine), L), -100, dtype=torch.int64)  # -100: no target (F.cross_entropy ignores it)
                for r, (a, b) in enumerate(mine):
                    s, e = a + w * L, min(a + (w + 1) * L, b)
                    if e > s:
                        x[r, : e - s], y[r, : e - s] = val_tokens[s:e], val_tokens[s + 1 : e + 1]
                x, y = x.to(device), y.to(device)
                starts = x == bos_id
                starts[:, 0] |= w == 0  # a row starts a document
                hymba_layer.carry_state(model, starts)
                for block in model.blocks:
                    block.attn.pos_offset = w * L
                scored = y != -100
                sums[0] += model(x, y).double() * scored.sum()
                sums[1] += scored.sum()
                sums[2] += (target_bytes(x, y.clamp(min=0), luts) * scored).double().sum()
    finally:
        hymba_layer.carry_state(model, None)
        for block in model.blocks:
            block.attn.pos_offset = 0
    model.train()
    if args.distributed:
        dist.all_reduce(sums)
    loss, targets, nbytes = sums.tolist()
    return loss / targets, loss / math.log(2) / nbytes


# ----------------------------------------------------------------------------- export: int8 + zlib/zstd

INT8_KEEP_FLOAT_MAX_NUMEL = 65_536
INT8_CLIP_QUANTILE = 0.9999984


def quantize_state_dict_int8(state: dict[str, Tensor]) -> tuple[dict, int]:
    """Per-row int8 for large float matrices (fp16 scales); small tensors pass through (fp32 for control
    tensors, fp16 otherwise); non-float tensors exact. Returns (container, payload bytes)."""
    out = dict(__quant_format__="int8_clean_per_row_v1", quantized={}, scales={}, dtypes={}, passthrough={}, qmeta={}, passthrough_orig_dtypes={})
    for name, t in state.items():
        t = t.detach().cpu()
        if not t.is_floating_point():
            out["passthrough"][name] = t
        elif t.numel() <= INT8_KEEP_FLOAT_MAX_NUMEL:
            keep = torch.float32 if is_control(name) else torch.float16
            if t.dtype != keep:
                out["passthrough_orig_dtypes"][name] = str(t.dtype).removeprefix("torch.")
            out["passthrough"][name] = t.to(keep).contiguous()
        else:
            t32 = t.float()
            if t32.ndim == 2:
                clip = torch.quantile(t32.abs(), INT8_CLIP_QUANTILE, dim=1)
                scale = (clip / 127).clamp_min(1 / 127)
                q = torch.clamp(torch.round(torch.maximum(torch.minimum(t32, clip[:, None]), -clip[:, None]) / scale[:, None]), -127, 127)
                out["scales"][name], out["qmeta"][name] = scale.to(torch.float16), dict(scheme="per_row", axis=0)
            else:
                clip = float(torch.quantile(t32.abs().flatten(), INT8_CLIP_QUANTILE))
                scale = torch.tensor(clip / 127 if clip > 0 else 1.0)
                q = torch.clamp(torch.round(t32.clamp(-clip, clip) / scale), -127, 127)
                out["scales"][name] = scale
            out["quantized"][name], out["dtypes"][name] = q.to(torch.int8).contiguous(), str(t.dtype).removeprefix("torch.")
    payload = sum(t.numel() * t.element_size() for part in ("quantized", "scales", "passthrough") for t in out[part].values())
    for optional in ("qmeta", "passthrough_orig_dtypes"):
        if not out[optional]:
            del out[optional]
    return out, payload


def dequantize_state_dict_int8(obj: dict) -> dict[str, Tensor]:
    state = {}
    for name, q in obj["quantized"].items():
        scale = obj["scales"][name].float()
        w = q.float() * (scale[:, None] if obj.get("qmeta", {}).get(name) else scale)
        state[name] = w.to(getattr(torch, obj["dtypes"][name]))
    for name, t in obj["passthrough"].items():
        orig = obj.get("passthrough_orig_dtypes", {}).get(name)
        state[name] = t.to(getattr(torch, orig)) if orig else t
    return state


def compress(data: bytes, compressor: str) -> bytes:
    if compressor == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=22).compress(data)
    return zlib.compress(data, level=9)


def decompress(data: bytes, compressor: str) -> bytes:
    if compressor == "zstd":
        import zstandard
        return zstandard.ZstdDecompressor().decompress(data)
    return zlib.decompress(data)


def write_atomic(path: str, data: bytes) -> None:
    """Write to a temporary name and rename: readers see the old file or the whole new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# ----------------------------------------------------------------------------- training

class NonFiniteLoss(RuntimeError):
    pass


setup_done = False  # errors after it are bugs and keep their traceback


def lr_multiplier(args: Hyperparameters, step: int, elapsed_ms: float) -> float:
    """Linear warmdown to 0 over the last WARMDOWN_ITERS steps, predicted from step time under a cap."""
    if args.warmdown_iters <= 0:
        return 1.0
    if args.max_wallclock_seconds <= 0:
        start = max(args.iterations - args.warmdown_iters, 0)
        return max((args.iterations - step) / args.warmdown_iters, 0.0) if step >= start else 1.0
    warmdown_ms = args.warmdown_iters * elapsed_ms / max(step, 1)
    remaining_ms = max(1000.0 * args.max_wallclock_seconds - elapsed_ms, 0.0)
    return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0


@record
def main():
    global setup_done
    if tuple(int(n) for n in torch.__version__.split("+")[0].split(".")[:2]) < (2, 9):
        raise ImportError(f"torch {torch.__version__} is too old: train_gpt.py needs torch >= 2.9 (torch.optim.Muon)")
    args = Hyperparameters()
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", args.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.distributed:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    master = args.rank == 0
    logfile = f"logs/{args.run_id}.txt"

    def log0(msg: str, console: bool = True):
        if master:
            with open(logfile, "a", encoding="utf-8") as f:
                print(msg, file=f)
            if console:
                print(msg, flush=True)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    pending: list[str] = []  # hybrid-layer lines wait until the source heads the log
    base_model, code_files = build_model(args, device, pending.append)  # config errors surface here, before any data is read
    sp = load_tokenizer(args)
    luts = build_sentencepiece_luts(sp, args.vocab_size, device)
    train_files = find_shards(args.train_files)
    load_data_shard(train_files[0], args.vocab_size)  # and the first train shard's token ids
    val_tokens = load_validation_tokens(args.val_files, args.train_seq_len, args.vocab_size)
    setup_done = True  # config and data are checked: only now are logs/ and artifacts written
    sources = [Path(f).read_text(encoding="utf-8") for f in code_files]
    if master:
        os.makedirs("logs", exist_ok=True)
        with open(logfile, "w", encoding="utf-8") as f:
            print("\n".join(sources), file=f)
    log0("=" * 100, console=False)
    log0(f"Running Python {sys.version}\nRunning PyTorch {torch.__version__}", console=False)
    if use_cuda:
        log0(subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout, console=False)
    log0("=" * 100, console=False)
    for line in pending:
        log0(line)

    log0(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={args.tokenizer_path}")
    log0(f"train_loader:dataset:{Path(args.data_path).name} train_shards:{len(train_files)}")
    log0(f"val_loader:shards pattern={args.val_files} tokens:{val_tokens.numel() - 1}")
    log0(f"model_params:{sum(p.numel() for p in base_model.parameters())}")
    log0(f"world_size:{args.world_size} grad_accum_steps:{args.grad_accum_steps}")
    log0(f"device:{torch.cuda.get_device_name(device) if use_cuda else 'cpu'} torch_compile:{args.torch_compile} autocast_bf16:{use_cuda}")
    log0(f"attention_mode:gqa num_heads:{args.num_heads} num_kv_heads:{args.num_kv_heads}")
    log0(f"tie_embeddings:{args.tie_embeddings} embed_lr:{args.tied_embed_lr if args.tie_embeddings else args.embed_lr} "
         f"head_lr:{args.head_lr if not args.tie_embeddings else 0.0} matrix_lr:{args.matrix_lr} scalar_lr:{args.scalar_lr}")
    log0(f"train_batch_tokens:{args.train_batch_tokens} train_seq_len:{args.train_seq_len} iterations:{args.iterations} "
         f"warmup_steps:{args.warmup_steps} max_wallclock_seconds:{args.max_wallclock_seconds:.3f}")
    log0(f"seed:{args.seed}")

    model = torch.compile(base_model, dynamic=False, fullgraph=True) if args.torch_compile else base_model
    if args.distributed:
        model = DDP(model, device_ids=[args.local_rank] if use_cuda else None, broadcast_buffers=False)
    optimizers = build_optimizers(base_model, args, device)
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=use_cuda)

    def train_step(loader: DistributedTokenLoader, lr_mul: float, momentum: float) -> Tensor:
        total = torch.zeros((), device=device)
        for micro in range(args.grad_accum_steps):
            if args.distributed:
                model.require_backward_grad_sync = micro == args.grad_accum_steps - 1
            x, y = loader.next_batch(args.train_batch_tokens, args.train_seq_len, args.grad_accum_steps)
            with autocast():
                loss = model(x, y)
            total += loss.detach()
            (loss / args.grad_accum_steps).backward()
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_mul
                if isinstance(opt, torch.optim.Muon):
                    group["momentum"] = momentum
        if args.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(base_model.parameters(), args.grad_clip_norm)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return total / args.grad_accum_steps

    # Compile warm-up on real batches, then restore weights, optimizer state and the data stream.
    if args.warmup_steps > 0:
        saved_model = {k: v.detach().cpu().clone() for k, v in base_model.state_dict().items()}
        saved_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        loader = DistributedTokenLoader(train_files, args.vocab_size, args.rank, args.world_size, device)
        for i in range(args.warmup_steps):
            train_step(loader, 1.0, args.muon_momentum)
            if i + 1 == args.warmup_steps or (i + 1) % 10 == 0:
                log0(f"warmup_step:{i + 1}/{args.warmup_steps}")
        base_model.load_state_dict(saved_model, strict=True)
        for opt, state in zip(optimizers, saved_opts):
            opt.load_state_dict(state)
    loader = DistributedTokenLoader(train_files, args.vocab_size, args.rank, args.world_size, device)

    def sync():
        if use_cuda:
            torch.cuda.synchronize()

    train_ms, stop_after_step, last_good = 0.0, None, None
    sync()
    t0 = time.perf_counter()
    step = 0
    while True:
        last_step = step == args.iterations or step == stop_after_step
        if last_step or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
            sync()
            train_ms += 1000.0 * (time.perf_counter() - t0)  # the clock pauses during validation
            val_loss, val_bpb = eval_val(args, model, device, val_tokens, luts)
            log0(f"step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms")
            sync()
            t0 = time.perf_counter()
        if last_step:
            if stop_after_step is not None and step < args.iterations:
                log0(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{step}/{args.iterations}")
            break
        elapsed_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        warm = min(step / args.muon_momentum_warmup_steps, 1.0) if args.muon_momentum_warmup_steps > 0 else 1.0
        momentum = (1 - warm) * args.muon_momentum_warmup_start + warm * args.muon_momentum
        train_loss = train_step(loader, lr_multiplier(args, step, elapsed_ms), momentum)
        step += 1
        elapsed_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
        # one small all-reduce per step: every rank stops together, on the cap or on a non-finite loss
        capped = args.max_wallclock_seconds > 0 and elapsed_ms >= 1000.0 * args.max_wallclock_seconds
        flags = torch.stack([torch.tensor(float(capped), device=device), (~torch.isfinite(train_loss)).float()])
        if args.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        (capped, bad), loss_value = flags.tolist(), train_loss.item()
        if bad:
            log0(f"step:{step}/{args.iterations} train_loss:{loss_value} non-finite on some rank; stopping. "
                 + (f"last finite train_loss:{last_good[1]:.4f} at step:{last_good[0]}" if last_good else "no finite step before it"))
            raise NonFiniteLoss(f"non-finite training loss at step {step}; lower the learning rates or check the data")
        last_good = (step, loss_value)
        if step <= 10 or step % args.train_log_every == 0 or capped:
            log0(f"step:{step}/{args.iterations} train_loss:{loss_value:.4f} train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / step:.2f}ms")
        if capped and stop_after_step is None:
            stop_after_step = step
    if use_cuda:
        log0(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")

    # Export: raw weights for debugging, then the int8 artifact, reloaded from disk and re-scored.
    label = f"int8+{args.compressor}"
    ptz_path = "final_model.int8.ptz"
    code_bytes = sum(len(s.encode("utf-8")) for s in sources)
    if master:
        raw = torch_bytes(base_model.state_dict())
        write_atomic("final_model.pt", raw)
        log0(f"Serialized model: {len(raw)} bytes")
        log0(f"Code size: {code_bytes} bytes")
        log0(f"Total submission size: {len(raw) + code_bytes} bytes")
        quant, payload = quantize_state_dict_int8(base_model.state_dict())
        quant_raw = torch_bytes(quant)
        blob = compress(quant_raw, args.compressor)
        write_atomic(ptz_path, blob)
        log0(f"Serialized model {label}: {len(blob)} bytes (payload:{payload} raw_torch:{len(quant_raw)} payload_ratio:{sum(t.numel() * t.element_size() for t in base_model.state_dict().values()) / payload:.2f}x)")
        log0(f"Total submission size {label}: {len(blob) + code_bytes} bytes")
    if args.distributed:
        dist.barrier()
    with open(ptz_path, "rb") as f:
        quant = torch.load(io.BytesIO(decompress(f.read(), args.compressor)), map_location="cpu")
    base_model.load_state_dict(dequantize_state_dict_int8(quant), strict=True)
    sync()
    t_eval = time.perf_counter()
    q_loss, q_bpb = eval_val(args, model, device, val_tokens, luts)
    tag = f"final_int8_{args.compressor}_roundtrip"
    log0(f"{tag} val_loss:{q_loss:.4f} val_bpb:{q_bpb:.4f} eval_time:{1000.0 * (time.perf_counter() - t_eval):.0f}ms")
    log0(f"{tag}_exact val_loss:{q_loss:.8f} val_bpb:{q_bpb:.8f}")
    if args.eval_carry_state:
        t_eval = time.perf_counter()
        c_loss, c_bpb = eval_val_carried(args, base_model, device, val_tokens, luts, sp.bos_id())
        log0(f"{tag}_carried val_loss:{c_loss:.8f} val_bpb:{c_bpb:.8f} eval_time:{1000.0 * (time.perf_counter() - t_eval):.0f}ms")
    total_bytes = os.path.getsize(ptz_path) + code_bytes
    if args.distributed:  # DDP's reducer holds the process group: freed after it, at exit, a gloo rank aborts
        del model
        gc.collect()
        dist.destroy_process_group()
    if total_bytes > ARTIFACT_LIMIT_BYTES:
        log0(f"artifact_over_budget: {total_bytes} bytes > {ARTIFACT_LIMIT_BYTES} (ALLOW_OVER_BUDGET={int(args.allow_over_budget)})")
        if not args.allow_over_budget:
            sys.exit(3)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, ImportError) as e:  # bad config or data: one line, exit 2
        if setup_done:
            raise
        print(f"train_gpt.py: error: {e}", file=sys.stderr)
        sys.exit(2)
