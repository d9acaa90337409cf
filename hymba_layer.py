"""Hybrid attention + SSM layers for train_gpt.py (Hymba-style parallel heads).

A HymbaLayer replaces a block's CausalSelfAttention: some of its heads stay the host's GQA attention
(RMS-normed q/k, RoPE, q_gain, the host's attention kernel), the others become Mamba-2 (SSD) heads
reading the same input, and one output projection merges the two. The scan is plain PyTorch (cumsum,
exp, matmuls), so the whole model still compiles with torch.compile(fullgraph=True).

Host contract - all the module needs from a train_gpt.py, and how it finds it:
  1. register_host_classes(CastedLinear, Rotary, apply_rotary_emb), called once after those three are
     defined. The module where CastedLinear lives is "the host" for everything below.
  2. build_and_swap_hymba_layers(model) right after the model is built, before the optimizers: for each
     index in HYMBA_LAYERS, model.blocks[i].attn becomes a HymbaLayer (a no-op without HYMBA_LAYERS).
     The shape comes from the replaced attention (c_q, num_heads, num_kv_heads, head_dim, q_gain); the
     hybrid layer takes over its rotary and the flags the host set on it (rope_dims: partial RoPE,
     use_xsa: XSA), and lives at the same name, so hooks on `.attn.` CastedLinears (GPTQ) see it.
  3. Routing by name patterns: every module-level tuple/list of strings in the host whose name ends in
     _NAME_PATTERNS (CONTROL_TENSOR_NAME_PATTERNS, INT8_KEEP_FLOAT_FP32_NAME_PATTERNS) gets
     CONTROL_PATTERNS appended, so the host keeps the SSM dynamics in fp32, trains them with Adam and
     exports them unquantized where it can. Every hybrid parameter is 1-D or 2-D, as both hosts expect.
  4. Attention kernel: the host's module-level flash_attn_3_func(q, k, v, causal=True) on
     (batch, T, heads, head_dim) when it has one (FA3 record scripts), else F.scaled_dot_product_attention
     (is_causal=True), as the root script. Only a plain causal mask is ever asked of it.
HymbaLayer also has CausalSelfAttention's constructor, so a host may swap it in by class.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------- configuration

ENV_VARS = ("HYMBA_LAYERS", "HYMBA_SSM_HEADS", "HYMBA_SSM_STATE", "HYMBA_SCAN_CHUNK", "HYMBA_GROUPS",
            "HYMBA_CONV", "HYMBA_GATE", "HYMBA_MERGE", "HYMBA_META_TOK", "HYMBA_KV_SHARE")
# substrings of the hybrid layers' dynamics tensors: the host keeps them fp32, trains them with Adam
# and exports them unquantized (bf16 or int8 decay rates make the scan drift or blow up)
CONTROL_PATTERNS = ("ssm.A_log", "ssm.dt_bias", "ssm.D", "ssm.conv_weight", "merge_gain", "meta_kv")


def hymba_env() -> dict[str, str]:
    """The HYMBA_* env vars that are set; an unknown name is an error (a typo would otherwise be ignored)."""
    env = {k: v.strip() for k, v in os.environ.items() if k.startswith("HYMBA_") and v.strip()}
    unknown = sorted(set(env) - set(ENV_VARS))
    if unknown:
        raise ValueError(f"unknown {', '.join(unknown)}: the hybrid-layer env vars are {', '.join(ENV_VARS)}")
    return env


@dataclass(frozen=True)
class HymbaConfig:
    """One field per HYMBA_* env var; defaults measured (README, "Why these defaults")."""

    ssm_heads: int           # HYMBA_SSM_HEADS: how many of the layer's heads become SSM heads (default: about half)
    layers: tuple[int, ...] = ()  # HYMBA_LAYERS: block indices to swap, "0" or "0,1"
    ssm_state: int = 16      # HYMBA_SSM_STATE: N, state size per SSM head
    scan_chunk: int = 64     # HYMBA_SCAN_CHUNK: Q, chunk length of the SSD scan (speed only: exact for any Q)
    groups: int = 1          # HYMBA_GROUPS: G, groups of SSM heads that share B and C
    conv: int = 4            # HYMBA_CONV: kernel of the causal depthwise conv on x, B, C (0 = off)
    gate: bool = True        # HYMBA_GATE: SiLU output gate on the SSM heads
    merge: str = "concat"    # HYMBA_MERGE: concat | mean (see HymbaLayer)
    meta_tok: int = 0        # HYMBA_META_TOK: learned key/value prefix entries per layer (0 = off)
    kv_share: bool = False   # HYMBA_KV_SHARE: a hybrid layer right after another reuses its K/V projections

    @classmethod
    def from_env(cls, num_heads: int, num_kv_heads: int, head_dim: int, num_layers: int | None = None) -> HymbaConfig:
        """The HYMBA_* env vars checked against the host's shape. HYMBA_LAYERS is read when num_layers is given."""
        env = hymba_env()

        def read(name, default, ok, valid, parse=int):
            raw = env.get(name, "")
            try:
                value = parse(raw) if raw else default
            except ValueError:
                value = None
            if value is None or not ok(value):
                shown = repr(raw) if raw else "unset" if default is None else f"unset (default {default})"
                raise ValueError(f"{name}={shown} is invalid: expected {valid}")
            return value

        layers = ()
        if num_layers is not None:
            layers = tuple(sorted(read("HYMBA_LAYERS", None, lambda v: len(set(v)) == len(v) and all(0 <= i < num_layers for i in v),
                                       f"distinct comma-separated block indices in 0..{num_layers - 1}",
                                       parse=lambda s: tuple(int(i) for i in s.split(",")))))
        adjacent = any(j - i == 1 for i, j in zip(layers, layers[1:]))
        # attention keeps a positive multiple of the KV heads (GQA); the default gives the SSM about half
        splits = [s for s in range(1, num_heads) if (num_heads - s) % num_kv_heads == 0]
        ssm_heads = read("HYMBA_SSM_HEADS", num_heads - num_kv_heads * math.ceil(num_heads / 2 / num_kv_heads), lambda v: v in splits,
                         f"one of {splits} (the heads left for attention, of {num_heads}, must be a positive multiple of the {num_kv_heads} KV heads)")
        attn_width = (num_heads - ssm_heads) * head_dim
        d = cls(ssm_heads)
        rows = [  # (field, env var, check, what is valid, parse)
            ("ssm_state", "HYMBA_SSM_STATE", lambda v: v > 0, "a positive int", int),
            ("scan_chunk", "HYMBA_SCAN_CHUNK", lambda v: v > 0, "a positive int", int),
            ("groups", "HYMBA_GROUPS", lambda v: v > 0 and ssm_heads % v == 0, f"a divisor of the SSM heads ({ssm_heads})", int),
            ("conv", "HYMBA_CONV", lambda v: v >= 0, "a kernel size >= 0 (0 = off)", int),
            ("gate", "HYMBA_GATE", lambda v: v in (0, 1), "0 or 1", int),
            ("merge", "HYMBA_MERGE", lambda v: v == "concat" or (v == "mean" and attn_width % ssm_heads == 0),
             f"concat or mean (mean needs the attention width {attn_width} divisible by the SSM heads {ssm_heads})", str),
            ("meta_tok", "HYMBA_META_TOK", lambda v: v >= 0, "an int >= 0 (0 = off)", int),
            ("kv_share", "HYMBA_KV_SHARE", lambda v: v == 0 or (v == 1 and adjacent),
             f"0 or 1 (1 needs two adjacent indices in HYMBA_LAYERS, got {','.join(map(str, layers)) or 'none'})", int),
        ]
        values = {field: read(var, getattr(d, field) if field == "merge" else int(getattr(d, field)), ok, valid, parse)
                  for field, var, ok, valid, parse in rows}
        return cls(ssm_heads, layers, **{k: bool(v) if k in ("gate", "kv_share") else v for k, v in values.items()})


# ----------------------------------------------------------------------------- the scan

def ssd_scan_reference(x: Tensor, log_a: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence one step at a time (slow; for tests):  S_t = exp(log_a_t) S_{t-1} + x_t B_t^T,  y_t = S_t C_t.
    Same shapes and dtypes as ssd_scan."""
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    f32 = torch.promote_types(log_a.dtype, torch.float32)
    B, C = B.repeat_interleave(H // G, dim=2).to(f32), C.repeat_interleave(H // G, dim=2).to(f32)  # (batch, T, H, N)
    S = torch.zeros(b, H, P, N, dtype=f32, device=x.device) if initial_state is None else initial_state.to(f32)
    ys = []
    for t in range(T):
        S = log_a[:, t, :, None, None].to(f32).exp() * S + x[:, t, :, :, None].to(f32) * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]))
    return torch.stack(ys, dim=1).to(x.dtype), S


def segsum(a: Tensor) -> Tensor:
    """(..., Q) -> (..., Q, Q) with [i, j] = a[j+1] + ... + a[i] for j <= i and -inf above the diagonal."""
    cs = a.cumsum(-1)
    causal = torch.ones(a.size(-1), a.size(-1), dtype=torch.bool, device=a.device).tril()
    # mask after subtracting: -inf inside the subtraction would give nan gradients
    return (cs[..., :, None] - cs[..., None, :]).masked_fill(~causal, -math.inf)


def ssd_scan(x: Tensor, log_a: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64,
             initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan (Mamba-2) of  S_t = exp(log_a_t) S_{t-1} + x_t B_t^T,  y_t = S_t C_t.

    x (batch, T, H, P), already scaled by dt;  log_a (batch, T, H) <= 0;  B, C (batch, T, G, N), where
    head h reads group h // (H/G);  initial_state (batch, H, P, N) or None for zeros.
    Returns y (batch, T, H, P) in x's dtype and the final state (batch, H, P, N) in fp32 (fp64 for fp64).
    Log-decays, their sums and their exps are fp32: every exponent is a sum of log_a <= 0, so every
    decay lies in [0, 1] and nothing is divided by a cumulative product. Matmuls run in x's dtype, except
    the hand-over of states between chunks (step 3), which autocast does not touch: fp32 tensors, fp32
    accumulation. Where a host allows TF32 (both hosts do on CUDA), that one matmul rounds its inputs to
    TF32 (10-bit mantissa, relative 2^-11): 8x finer than the bf16 (2^-8) of every other matmul here, so
    it is left so rather than paying for a TF32-proof product (tests/test_scan.py emulates it).
    """
    # axes: b batch, c chunk, l/s step in chunk (query/key), g group, r head in group, p head dim, n state,
    #       z chunk boundary
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    R, Q = H // G, chunk_size
    f32 = torch.promote_types(log_a.dtype, torch.float32)
    pad = -T % Q  # padded steps have a = 1 and no input: they change no output and not the final state
    x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    c = (T + pad) // Q
    X = x.view(b, c, Q, G, R, P)
    B, C = B.view(b, c, Q, G, N), C.view(b, c, Q, G, N)
    A = F.pad(log_a.to(f32), (0, 0, 0, pad)).view(b, c, Q, G, R).permute(0, 3, 4, 1, 2)  # (b, g, r, c, l)
    A_cumsum = A.cumsum(-1)
    to_steps = lambda d: d.permute(0, 3, 4, 1, 2)[..., None].to(x.dtype)  # (b, g, r, c, l) -> (b, c, l, g, r, 1)

    # 1. outputs from inputs of the same chunk: (C B^T * L) X with the decay mask L = exp(segsum(A))
    L = torch.exp(segsum(A)).to(x.dtype)
    CB = torch.einsum("bclgn,bcsgn->bgcls", C, B)
    Y_diag = torch.einsum("bgrcls,bcsgrp->bclgrp", CB[:, :, None] * L, X)

    # 2. each chunk's own final state: sum over steps s of exp(A summed over (s, chunk end]) X_s B_s^T
    decay_states = torch.exp(A_cumsum[..., -1:] - A_cumsum)
    states = torch.einsum("bcsgn,bcsgrp->bcgrpn", B, X * to_steps(decay_states))

    # 3. carry states across chunks in fp32: a (c+1) x (c+1) decay matrix over the chunk totals
    if initial_state is None:
        initial_state = torch.zeros(b, H, P, N, dtype=f32, device=x.device)
    states = torch.cat([initial_state.to(f32).view(b, 1, G, R, P, N), states.to(f32)], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))  # (b, g, r, z, c+1)
    with torch.autocast(x.device.type, enabled=False):
        states = torch.einsum("bgrzc,bcgrpn->bzgrpn", decay_chunk, states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. outputs from the state carried into each chunk: exp(A summed over the chunk up to l) S_start C_l
    Y_off = torch.einsum("bclgn,bcgrpn->bclgrp", C, states.to(x.dtype)) * to_steps(torch.exp(A_cumsum))

    y = (Y_diag + Y_off).reshape(b, c * Q, H, P)[:, :T]
    return y.to(x.dtype), final_state.reshape(b, H, P, N)


# ----------------------------------------------------------------------------- modules

CastedLinear = Rotary = apply_rotary_emb = None  # the host's, set by register_host_classes
host_namespace: dict = {}  # the host module's globals (see the contract above)
host_flash_attention = None  # the host's flash_attn_3_func, if it has one


def register_host_classes(casted_linear: type, rotary: type, rotary_emb) -> None:
    """Build hybrid layers from the host's CastedLinear, Rotary and apply_rotary_emb, so their attention
    heads compute what the host's attention does; the module defining CastedLinear is the host."""
    global CastedLinear, Rotary, apply_rotary_emb, host_namespace, host_flash_attention
    CastedLinear, Rotary, apply_rotary_emb = casted_linear, rotary, rotary_emb
    host_namespace = vars(sys.modules[casted_linear.__module__])
    host_flash_attention = host_namespace.get("flash_attn_3_func")


def require_host() -> None:
    if CastedLinear is None:
        raise RuntimeError("hymba_layer: call register_host_classes(CastedLinear, Rotary, apply_rotary_emb) before building hybrid layers")


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal GQA attention with the host's kernel; q (batch, T, heads, D), k/v (batch, T, kv_heads, D)."""
    if host_flash_attention is not None:
        return host_flash_attention(q, k, v, causal=True)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


class SSMBranch(nn.Module):
    """Mamba-2 heads on the layer input u (batch, T, dim) -> (batch, T, heads * head_dim):

        dt_t = softplus(W_dt u_t + dt_bias),   log a_t = -dt_t exp(A_log)
        S_t = a_t S_{t-1} + (dt_t x_t) B_t^T,  y_t = S_t C_t + D x_t,   optionally y_t *= silu(z_t)

    with x, B, C, z linear in u, and x, B, C optionally through a short causal conv and SiLU."""

    def __init__(self, dim: int, heads: int, head_dim: int, cfg: HymbaConfig):
        super().__init__()
        self.heads, self.head_dim, self.groups, self.state, self.chunk = heads, head_dim, cfg.groups, cfg.ssm_state, cfg.scan_chunk
        self.gate = cfg.gate
        self.xbc_width = heads * head_dim + 2 * cfg.groups * cfg.ssm_state
        self.in_proj = CastedLinear(dim, self.xbc_width + (heads * head_dim if cfg.gate else 0), bias=False)  # x, B, C[, z]
        self.dt_proj = CastedLinear(dim, heads, bias=False)
        # Mamba-2 inits: decay rates A = -exp(A_log) in [-16, -1], dt log-uniform in [1e-3, 1e-1]
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
        dt = torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.D = nn.Parameter(torch.ones(heads))
        self.conv_weight = None
        if cfg.conv:  # (channel, tap), 2-D as every host routes; nn.Conv1d's default init for a depthwise kernel
            bound = 1 / math.sqrt(cfg.conv)
            self.conv_weight = nn.Parameter(torch.empty(self.xbc_width, cfg.conv).uniform_(-bound, bound))

    def forward(self, u: Tensor) -> Tensor:
        b, t, _ = u.shape
        xbc = self.in_proj(u)
        xbc, z = xbc[..., : self.xbc_width], xbc[..., self.xbc_width :]
        if self.conv_weight is not None:  # Mamba-2: x, B and C see the last few tokens directly
            k = self.conv_weight.size(-1)
            xbc = F.conv1d(F.pad(xbc.transpose(1, 2), (k - 1, 0)), self.conv_weight.to(xbc.dtype)[:, None], groups=self.xbc_width)
            xbc = F.silu(xbc.transpose(1, 2))
        gn = self.groups * self.state
        x, B, C = xbc.split([self.heads * self.head_dim, gn, gn], dim=-1)
        x = x.reshape(b, t, self.heads, self.head_dim)
        dt = F.softplus(self.dt_proj(u).float() + self.dt_bias)  # (batch, T, heads), fp32
        log_a = -dt * self.A_log.exp()
        y, _ = ssd_scan((x * dt[..., None]).to(x.dtype), log_a, B.reshape(b, t, self.groups, self.state),
                        C.reshape(b, t, self.groups, self.state), self.chunk)
        y = (y + self.D.to(y.dtype)[:, None] * x).reshape(b, t, -1)
        return y * F.silu(z) if self.gate else y


class HymbaLayer(nn.Module):
    """Drop-in for the host's CausalSelfAttention (batch, T, dim) -> (batch, T, dim): of num_heads heads,
    cfg.ssm_heads become SSM heads and the rest stay GQA attention; both read the same input.
      concat: [attention heads | SSM heads of head_dim each] -> proj; the width stays dim.
      mean:   (g_a * rmsnorm(attention) + g_s * rmsnorm(SSM)) / 2 -> proj (Hymba); the SSM heads together
              have the attention heads' width.
    Meta tokens are learned key/value entries every query sees, without positions (T and RoPE unchanged).
    With kv_source (the hybrid layer just before), its K/V projections are used instead of own ones.
    Extra constructor arguments of a host's attention (PR #1493: train_seq_len) go to its Rotary."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float, *rotary_args,
                 cfg: HymbaConfig | None = None, kv_source: HymbaLayer | None = None):
        super().__init__()
        require_host()
        self.head_dim = dim // num_heads
        cfg = cfg or HymbaConfig.from_env(num_heads, num_kv_heads, self.head_dim)
        self.attn_heads, self.num_kv_heads = num_heads - cfg.ssm_heads, num_kv_heads
        self.merge = cfg.merge
        attn_width, kv_width = self.attn_heads * self.head_dim, num_kv_heads * self.head_dim
        ssm_width = cfg.ssm_heads * self.head_dim if cfg.merge == "concat" else attn_width
        self.c_q = CastedLinear(dim, attn_width, bias=False)
        self.kv_shared = kv_source is not None
        if self.kv_shared:  # plain attributes, not submodules: the shared weights are stored once, in kv_source
            object.__setattr__(self, "c_k", kv_source.c_k)
            object.__setattr__(self, "c_v", kv_source.c_v)
        else:
            self.c_k = CastedLinear(dim, kv_width, bias=False)
            self.c_v = CastedLinear(dim, kv_width, bias=False)
        self.q_gain = nn.Parameter(torch.full((self.attn_heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.head_dim, rope_base, *rotary_args)
        self.rope_dims, self.use_xsa = 0, False  # host flags, set after construction (PR #1493: partial RoPE, XSA)
        self.meta_kv = None
        if cfg.meta_tok:  # rows: keys, then values; values start at 0, so the prefix begins as a pure attention sink
            self.meta_kv = nn.Parameter(torch.cat([torch.randn(cfg.meta_tok, kv_width), torch.zeros(cfg.meta_tok, kv_width)]))
        self.ssm = SSMBranch(dim, cfg.ssm_heads, ssm_width // cfg.ssm_heads, cfg)
        if cfg.merge == "mean":
            self.merge_gain_attn = nn.Parameter(torch.ones(attn_width))
            self.merge_gain_ssm = nn.Parameter(torch.ones(attn_width))
        self.proj = CastedLinear(attn_width + ssm_width if cfg.merge == "concat" else attn_width, dim, bias=False)
        self.proj._zero_init = True  # the block starts as identity, as in the host
        nn.init.zeros_(self.proj.weight)

    def attention(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.c_q(x).view(b, t, self.attn_heads, self.head_dim)  # (batch, T, heads, head_dim)
        k = self.c_k(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.c_v(x).view(b, t, self.num_kv_heads, self.head_dim)
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        cos, sin = self.rotary(t, x.device, q.dtype)
        if cos.size(1) != t:  # the host's rotary is laid out for (batch, heads, T, head_dim)
            cos, sin = cos.transpose(1, 2), sin.transpose(1, 2)
        rope = (self.rope_dims,) if self.rope_dims else ()
        q, k = apply_rotary_emb(q, cos, sin, *rope), apply_rotary_emb(k, cos, sin, *rope)
        q = q * self.q_gain.to(q.dtype)[:, None]
        if self.meta_kv is None:
            y = causal_attention(q, k, v)
        else:  # [meta; tokens] under a plain causal mask: token i sees every meta entry and tokens <= i
            n = self.meta_kv.size(0) // 2
            meta_k, meta_v = self.meta_kv.to(q.dtype).view(2, 1, n, self.num_kv_heads, self.head_dim).expand(-1, b, -1, -1, -1)
            q = torch.cat([q.new_zeros(b, n, self.attn_heads, self.head_dim), q], dim=1)  # n query rows, dropped below
            y = causal_attention(q, torch.cat([F.rms_norm(meta_k, (self.head_dim,)), k], 1), torch.cat([meta_v, v], 1))[:, n:]
        if self.use_xsa:  # XSA: each head's output loses its component along its own value vector
            y = y.view(b, t, self.num_kv_heads, -1, self.head_dim)
            vn = F.normalize(v, dim=-1)[:, :, :, None]
            y = y - (y * vn).sum(-1, keepdim=True) * vn
        return y.reshape(b, t, -1)

    def forward(self, x: Tensor) -> Tensor:
        a, s = self.attention(x), self.ssm(x)
        if self.merge == "concat":
            return self.proj(torch.cat([a, s], dim=-1))
        # a norm and gain per branch: without them the SSM branch's scale drifts away from attention's
        a = F.rms_norm(a, (a.size(-1),), self.merge_gain_attn.to(a.dtype))
        s = F.rms_norm(s, (s.size(-1),), self.merge_gain_ssm.to(s.dtype))
        return self.proj(0.5 * (a + s))


# ----------------------------------------------------------------------------- swapping into a host

def extend_host_patterns() -> None:
    """Append CONTROL_PATTERNS to the host's module-level *_NAME_PATTERNS lists (contract, point 3)."""
    for name, value in list(host_namespace.items()):
        if name.endswith("_NAME_PATTERNS") and isinstance(value, (tuple, list)) and all(isinstance(p, str) for p in value):
            host_namespace[name] = type(value)([*value, *(p for p in CONTROL_PATTERNS if p not in value)])


def build_and_swap_hymba_layers(model: nn.Module, log=None) -> list[int]:
    """Replace model.blocks[i].attn with a HymbaLayer for each i in HYMBA_LAYERS and return those indices;
    without HYMBA_LAYERS, change nothing and return []. Logs one line per layer (rank 0)."""
    require_host()
    env = hymba_env()
    if "HYMBA_LAYERS" not in env:
        stray = sorted(env)
        if stray:
            raise ValueError(f"{', '.join(stray)} set but HYMBA_LAYERS is empty: set HYMBA_LAYERS (e.g. 0) to swap in hybrid layers, or unset them")
        return []
    first = model.blocks[0].attn
    cfg = HymbaConfig.from_env(first.num_heads, first.num_kv_heads, first.head_dim, len(model.blocks))
    if log is None:
        log = print if os.environ.get("RANK", "0") == "0" else (lambda line: None)
    prev, prev_i = None, None
    for i in cfg.layers:
        old = model.blocks[i].attn
        # KV sharing pairs a layer with the one just before it, unless that one already borrows
        share = cfg.kv_share and prev_i == i - 1 and not prev.kv_shared
        layer = HymbaLayer(old.c_q.in_features, old.num_heads, old.num_kv_heads, 10000.0, old.q_gain.detach().float().mean().item(),
                           cfg=cfg, kv_source=prev if share else None)
        layer.rotary = old.rotary  # the host's rotary, with whatever base, scaling and partial dims it was built with
        for flag in ("rope_dims", "use_xsa"):
            if hasattr(old, flag):
                setattr(layer, flag, getattr(old, flag))
        model.blocks[i].attn = layer.to(old.c_q.weight.device)
        log(f"hymba:layer {i} attn_heads:{layer.attn_heads} kv_heads:{layer.num_kv_heads} ssm_heads:{cfg.ssm_heads} "
            f"ssm_head_dim:{layer.ssm.head_dim} state:{cfg.ssm_state} groups:{cfg.groups} chunk:{cfg.scan_chunk} "
            f"conv:{cfg.conv} gate:{int(cfg.gate)} meta_tok:{cfg.meta_tok} kv:{f'shared_with_{prev_i}' if share else 'own'} "
            f"merge:{cfg.merge} rope_dims:{layer.rope_dims} xsa:{int(layer.use_xsa)} params:{sum(p.numel() for p in layer.parameters())}")
        prev, prev_i = layer, i
    extend_host_patterns()
    return list(cfg.layers)
