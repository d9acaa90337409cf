"""Hybrid attention + SSM layers for train_gpt.py (Hymba-style parallel heads).

A HymbaLayer replaces a block's CausalSelfAttention: some of its heads stay GQA attention (exactly the
host's: RMS-normed q/k, RoPE, q_gain), the others become Mamba-2 (SSD) heads reading the same input,
and one output projection merges the two. The scan is plain PyTorch (cumsum, exp, matmuls), so the
whole model still compiles with torch.compile(fullgraph=True). With HYMBA_LAYERS set (e.g. 4) the host
calls register_host_classes and build_and_swap_hymba_layers; HymbaConfig lists the other HYMBA_* vars.
"""
from __future__ import annotations

import math
import os
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


@dataclass(frozen=True)
class HymbaConfig:
    """One field per HYMBA_* env var. The defaults are provisional, to be settled by an ablation."""

    layers: tuple[int, ...]  # HYMBA_LAYERS: block indices to swap, "4" or "3,4"
    ssm_heads: int           # HYMBA_SSM_HEADS: how many of NUM_HEADS become SSM heads (default: about half)
    ssm_state: int = 16      # HYMBA_SSM_STATE: N, state size per SSM head
    scan_chunk: int = 64     # HYMBA_SCAN_CHUNK: Q, chunk length of the SSD scan
    groups: int = 1          # HYMBA_GROUPS: G, groups of SSM heads that share B and C
    conv: int = 4            # HYMBA_CONV: kernel of the causal depthwise conv on x, B, C (0 = off)
    gate: bool = True        # HYMBA_GATE: SiLU output gate on the SSM heads
    merge: str = "concat"    # HYMBA_MERGE: concat | mean (see HymbaLayer)
    meta_tok: int = 0        # HYMBA_META_TOK: learned key/value prefix entries per layer (0 = off)
    kv_share: bool = False   # HYMBA_KV_SHARE: a hybrid layer right after another reuses its K/V projections

    @classmethod
    def from_env(cls, args) -> HymbaConfig:
        """Read and check the HYMBA_* env vars against the host's shape (args: num_layers, num_heads, ...)."""
        env = {k: v.strip() for k, v in os.environ.items() if k.startswith("HYMBA_")}
        unknown = sorted(set(env) - set(ENV_VARS))
        if unknown:
            raise ValueError(f"unknown {', '.join(unknown)}: the hybrid-layer env vars are {', '.join(ENV_VARS)}")

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

        n, heads, kv_heads = args.num_layers, args.num_heads, args.num_kv_heads
        layers = tuple(sorted(read("HYMBA_LAYERS", None, lambda v: len(set(v)) == len(v) and all(0 <= i < n for i in v),
                                   f"distinct comma-separated block indices in 0..{n - 1}", parse=lambda s: tuple(int(i) for i in s.split(",")))))
        adjacent = any(j - i == 1 for i, j in zip(layers, layers[1:]))
        # attention keeps a multiple of NUM_KV_HEADS heads (GQA); the default gives the SSM about half
        splits = [s for s in range(1, heads) if (heads - s) % kv_heads == 0]
        ssm_heads = read("HYMBA_SSM_HEADS", heads - kv_heads * math.ceil(heads / 2 / kv_heads), lambda v: v in splits,
                         f"one of {splits} (NUM_HEADS={heads} minus the SSM heads must be a positive multiple of NUM_KV_HEADS={kv_heads})")
        attn_width = (heads - ssm_heads) * (args.model_dim // heads)
        return cls(
            layers=layers,
            ssm_heads=ssm_heads,
            ssm_state=read("HYMBA_SSM_STATE", cls.ssm_state, lambda v: v > 0, "a positive int"),
            scan_chunk=read("HYMBA_SCAN_CHUNK", cls.scan_chunk, lambda v: v > 0, "a positive int"),
            groups=read("HYMBA_GROUPS", cls.groups, lambda v: v > 0 and ssm_heads % v == 0, f"a divisor of the SSM heads ({ssm_heads})"),
            conv=read("HYMBA_CONV", cls.conv, lambda v: v >= 0, "a kernel size >= 0 (0 = off)"),
            gate=bool(read("HYMBA_GATE", int(cls.gate), lambda v: v in (0, 1), "0 or 1")),
            merge=read("HYMBA_MERGE", cls.merge, lambda v: v == "concat" or (v == "mean" and attn_width % ssm_heads == 0),
                       f"concat or mean (mean needs the attention width {attn_width} divisible by the SSM heads {ssm_heads})", parse=str),
            meta_tok=read("HYMBA_META_TOK", cls.meta_tok, lambda v: v >= 0, "an int >= 0 (0 = off)"),
            kv_share=bool(read("HYMBA_KV_SHARE", int(cls.kv_share), lambda v: v == 0 or (v == 1 and adjacent),
                               f"0 or 1 (1 needs two adjacent indices in HYMBA_LAYERS, got {','.join(map(str, layers))})")),
        )


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
    decay lies in [0, 1] and nothing is divided by a cumulative product. Matmuls run in x's dtype,
    except the fp32 hand-over of states between chunks.
    """
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    R, Q = H // G, chunk_size
    f32 = torch.promote_types(log_a.dtype, torch.float32)
    pad = -T % Q  # padded steps have a = 1 and no input: they change no output and not the final state
    x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    c = (T + pad) // Q
    X = x.view(b, c, Q, G, R, P)  # (batch, chunk, step, group, head in group, P)
    B, C = B.view(b, c, Q, G, N), C.view(b, c, Q, G, N)
    A = F.pad(log_a.to(f32), (0, 0, 0, pad)).view(b, c, Q, G, R).permute(0, 3, 4, 1, 2)  # (batch, group, head, chunk, step)
    A_cumsum = A.cumsum(-1)
    to_steps = lambda d: d.permute(0, 3, 4, 1, 2)[..., None].to(x.dtype)  # (b, g, r, c, step) -> (b, c, step, g, r, 1)

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
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[..., -1], (1, 0))))  # (b, g, r, c+1, c+1)
    with torch.autocast(x.device.type, enabled=False):
        states = torch.einsum("bgrzc,bcgrpn->bzgrpn", decay_chunk, states)
    states, final_state = states[:, :-1], states[:, -1]

    # 4. outputs from the state carried into each chunk: exp(A summed over the chunk up to l) S_start C_l
    Y_off = torch.einsum("bclgn,bcgrpn->bclgrp", C, states.to(x.dtype)) * to_steps(torch.exp(A_cumsum))

    y = (Y_diag + Y_off).reshape(b, c * Q, H, P)[:, :T]
    return y.to(x.dtype), final_state.reshape(b, H, P, N)


# ----------------------------------------------------------------------------- modules

CastedLinear = Rotary = apply_rotary_emb = None  # the host's, set by register_host_classes


def register_host_classes(casted_linear: type, rotary: type, rotary_emb) -> None:
    """Build hybrid layers from the host's CastedLinear, Rotary and apply_rotary_emb, so their attention
    heads compute exactly what the host's attention does."""
    global CastedLinear, Rotary, apply_rotary_emb
    CastedLinear, Rotary, apply_rotary_emb = casted_linear, rotary, rotary_emb


def require_host() -> None:
    if CastedLinear is None:
        raise RuntimeError("hymba_layer: call register_host_classes(CastedLinear, Rotary, apply_rotary_emb) before building hybrid layers")


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
        self.dt_proj = CastedLinear(dim, heads, bias=False)  # its own matrix: dt rows quantize with their own range
        # Mamba-2 inits: decay rates A = -exp(A_log) in [-16, -1], dt log-uniform in [1e-3, 1e-1]
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
        dt = torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.D = nn.Parameter(torch.ones(heads))
        self.conv_weight = None
        if cfg.conv:
            bound = 1 / math.sqrt(cfg.conv)  # nn.Conv1d's default for a depthwise kernel
            self.conv_weight = nn.Parameter(torch.empty(self.xbc_width, 1, cfg.conv).uniform_(-bound, bound))

    def forward(self, u: Tensor) -> Tensor:
        b, t, _ = u.shape
        xbc = self.in_proj(u)
        xbc, z = xbc[..., : self.xbc_width], xbc[..., self.xbc_width :]
        if self.conv_weight is not None:  # Mamba-2: x, B and C see the last few tokens directly
            k = self.conv_weight.size(-1)
            xbc = F.conv1d(F.pad(xbc.transpose(1, 2), (k - 1, 0)), self.conv_weight.to(xbc.dtype), groups=self.xbc_width)
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
    With kv_source (the hybrid layer just before), its K/V projections are used instead of own ones."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float,
                 cfg: HymbaConfig, kv_source: HymbaLayer | None = None):
        super().__init__()
        require_host()
        self.head_dim = dim // num_heads
        self.num_heads, self.num_kv_heads = num_heads - cfg.ssm_heads, num_kv_heads  # attention heads
        self.merge = cfg.merge
        attn_width, kv_width = self.num_heads * self.head_dim, num_kv_heads * self.head_dim
        ssm_width = cfg.ssm_heads * self.head_dim if cfg.merge == "concat" else attn_width
        self.c_q = CastedLinear(dim, attn_width, bias=False)
        self.kv_shared = kv_source is not None
        if self.kv_shared:  # plain attributes, not submodules: the shared weights are stored once, in kv_source
            object.__setattr__(self, "c_k", kv_source.c_k)
            object.__setattr__(self, "c_v", kv_source.c_v)
        else:
            self.c_k = CastedLinear(dim, kv_width, bias=False)
            self.c_v = CastedLinear(dim, kv_width, bias=False)
        self.q_gain = nn.Parameter(torch.full((self.num_heads,), qk_gain_init, dtype=torch.float32))
        self.rotary = Rotary(self.head_dim, rope_base)
        self.meta_kv = None
        if cfg.meta_tok:  # (key|value, token, kv_width); values start at 0: the prefix begins as a pure attention sink
            self.meta_kv = nn.Parameter(torch.stack([torch.randn(cfg.meta_tok, kv_width), torch.zeros(cfg.meta_tok, kv_width)]))
        self.ssm = SSMBranch(dim, cfg.ssm_heads, ssm_width // cfg.ssm_heads, cfg)
        if cfg.merge == "mean":
            self.merge_gain_attn = nn.Parameter(torch.ones(attn_width))
            self.merge_gain_ssm = nn.Parameter(torch.ones(attn_width))
        self.proj = CastedLinear(attn_width + ssm_width if cfg.merge == "concat" else attn_width, dim, bias=False)
        self.proj._zero_init = True  # the block starts as identity, as in the host
        nn.init.zeros_(self.proj.weight)

    def attention(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.c_q(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (batch, heads, T, head_dim)
        k = self.c_k(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        cos, sin = self.rotary(t, x.device, q.dtype)
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        gqa = self.num_kv_heads != self.num_heads
        if self.meta_kv is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            n = self.meta_kv.size(1)
            meta_k, meta_v = self.meta_kv.to(q.dtype).view(2, 1, n, self.num_kv_heads, self.head_dim).transpose(2, 3)
            k = torch.cat([F.rms_norm(meta_k, (self.head_dim,)).expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([meta_v.expand(b, -1, -1, -1), v], dim=2)
            visible = torch.ones(t, n + t, dtype=torch.bool, device=x.device).tril(n)  # the prefix, then causal
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)
        return y.transpose(1, 2).reshape(b, t, -1)

    def forward(self, x: Tensor) -> Tensor:
        a, s = self.attention(x), self.ssm(x)
        if self.merge == "concat":
            return self.proj(torch.cat([a, s], dim=-1))
        # a norm and gain per branch: without them the SSM branch's scale drifts away from attention's
        a = F.rms_norm(a, (a.size(-1),), self.merge_gain_attn.to(a.dtype))
        s = F.rms_norm(s, (s.size(-1),), self.merge_gain_ssm.to(s.dtype))
        return self.proj(0.5 * (a + s))


# ----------------------------------------------------------------------------- swapping into a host

def build_and_swap_hymba_layers(model: nn.Module, args) -> list[int]:
    """Replace model.blocks[i].attn with a HymbaLayer for each i in HYMBA_LAYERS; returns those indices.
    Appends the dynamics tensors' name patterns to args.control_patterns and logs one line per layer."""
    require_host()
    cfg = HymbaConfig.from_env(args)
    log = getattr(args, "log", print)
    prev, prev_i = None, None
    for i in cfg.layers:
        # KV sharing pairs a layer with the one just before it, unless that one already borrows
        share = cfg.kv_share and prev_i == i - 1 and not prev.kv_shared
        layer = HymbaLayer(args.model_dim, args.num_heads, args.num_kv_heads, args.rope_base, args.qk_gain_init,
                           cfg, kv_source=prev if share else None)
        model.blocks[i].attn = layer.to(model.blocks[i].attn.c_q.weight.device)
        log(f"hymba:layer {i} attn_heads:{layer.num_heads} kv_heads:{layer.num_kv_heads} ssm_heads:{cfg.ssm_heads} "
            f"ssm_head_dim:{layer.ssm.head_dim} state:{cfg.ssm_state} groups:{cfg.groups} chunk:{cfg.scan_chunk} "
            f"conv:{cfg.conv} gate:{int(cfg.gate)} meta_tok:{cfg.meta_tok} kv:{f'shared_with_{prev_i}' if share else 'own'} "
            f"merge:{cfg.merge} params:{sum(p.numel() for p in layer.parameters())}")
        prev, prev_i = layer, i
    args.control_patterns.extend(p for p in CONTROL_PATTERNS if p not in args.control_patterns)
    return list(cfg.layers)
