"""Hybrid attention + SSM heads for train_gpt.py (Hymba-style parallel heads, Mamba-2's duality).

A Mamba-2 (SSD) head is decayed linear attention: with C = q, B = k and x = v it computes
    S_t = a_t S_{t-1} + (dt_t x_t) B_t^T   (S is P x N: head dim x state),   y_t = S_t C_t + D x_t.
So in a hybrid layer the SSM heads are some of the attention layer's OWN heads: they read the q, k, v rows
the host already projected, normed and rotated, and only small dynamics are added per layer (dt weights
read from the head's value row, A_log, dt_bias, D, optional conv taps: a few hundred numbers). The host's
weights, banks, gates, Hessians and LoRA cover the SSM heads unchanged. The scan is plain PyTorch
(cumsum, exp, matmuls), so the model still compiles with torch.compile(fullgraph=True).

Host contract - everything this module reads from a host script:
  1. build_and_swap_hymba_layers(model) after each model build: for each index in HYMBA_LAYERS the attention
     module model.blocks[i].attn gets a HybridHeads child `.hymba` (a no-op without HYMBA_LAYERS). It reads
     the attention's int attributes num_heads, num_kv_heads (fewer than num_heads or equal; at least 2 KV
     groups, so attention and SSM heads each get whole groups) and head_dim.
  2. Every attention-kernel call of such a module goes through hymba_attention(layer, kernel, q, k, v, ...)
     (tools/patch_host.py rewrites the host's calls): F.scaled_dot_product_attention on (batch, heads, T,
     head_dim) with is_causal=True and no mask; flash_attn_3_func(q, k, v, causal=True) on (batch, T, heads,
     head_dim); flash_attn_varlen_func on packed (tokens, heads, head_dim) with cu_seqlens_q == cu_seqlens_k,
     causal=True and no window - there the SSM state and conv restart at every segment. The first heads stay
     the host's attention (its kernel; with HYMBA_WINDOW, FA3's window_size or, on SDPA, local_attention),
     the last HYMBA_SSM_HEADS are SSM heads; the swap refuses a module whose forward does not call it. K/V
     arrive with the layer's own KV heads (not repeated); scale/softmax_scale reach both kinds of heads; a
     kernel's (out, lse) tuple comes back extended; any other keyword is refused in one line.
  3. Routing by name: the host's module-level CONTROL_TENSOR_NAME_PATTERNS (optimizer: Adam and fp32, as
     every challenge host reads it) and INT8_KEEP_FLOAT_FP32_NAME_PATTERNS (root export: kept fp32), where
     they exist, get CONTROL_PATTERNS appended; the host finds them in the module that defines type(model).
"""
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------- configuration

ENV_VARS = ("HYMBA_LAYERS", "HYMBA_SSM_HEADS", "HYMBA_SCAN_CHUNK", "HYMBA_CONV", "HYMBA_WINDOW")
# every dynamics tensor lives under `.attn.hymba.`: the host keeps them fp32, trains them with Adam (Muon
# only takes big matrices) and exports them unquantized where it can (int8 decay rates make the scan drift)
CONTROL_PATTERNS = (".hymba.",)
HOST_PATTERN_LISTS = ("CONTROL_TENSOR_NAME_PATTERNS", "INT8_KEEP_FLOAT_FP32_NAME_PATTERNS")


def hymba_env() -> dict[str, str]:
    """The HYMBA_* env vars that are set; an unknown name is an error (a typo would otherwise be ignored)."""
    env = {k: v.strip() for k, v in os.environ.items() if k.startswith("HYMBA_") and v.strip()}
    unknown = sorted(set(env) - set(ENV_VARS))
    if unknown:
        raise ValueError(f"unknown {', '.join(unknown)}: the hybrid-layer env vars are {', '.join(ENV_VARS)}")
    return env


@dataclass(frozen=True)
class HymbaConfig:
    """One field per HYMBA_* env var; defaults measured (RESULTS.md)."""

    ssm_heads: int                # HYMBA_SSM_HEADS: how many of the layer's last heads are SSM heads (whole KV groups)
    layers: tuple[int, ...] = ()  # HYMBA_LAYERS: block indices to make hybrid, "0" or "0,5"
    scan_chunk: int = 64          # HYMBA_SCAN_CHUNK: Q, chunk length of the SSD scan (speed only: exact for any Q)
    conv: int = 4                 # HYMBA_CONV: taps of a causal depthwise conv on the SSM heads' values x (0 = off)
    window: int = 0               # HYMBA_WINDOW: the attention heads see the last W tokens, the SSM heads all (0 = all)

    @classmethod
    def from_env(cls, num_heads: int, num_kv_heads: int, num_layers: int) -> "HymbaConfig":
        """The HYMBA_* env vars checked against the host's shape."""
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

        group = num_heads // num_kv_heads
        splits = list(range(group, num_heads, group))  # whole KV groups on both sides
        rows = [  # (env var, default, check, what is valid, parse)
            ("HYMBA_LAYERS", None, lambda v: len(set(v)) == len(v) and all(0 <= i < num_layers for i in v),
             f"distinct comma-separated block indices in 0..{num_layers - 1}",
             lambda s: tuple(sorted(int(i) for i in s.split(",")))),
            ("HYMBA_SSM_HEADS", group * (num_kv_heads // 2), lambda v: v in splits,
             f"one of {splits} (whole groups of the {group} heads sharing a KV head, attention keeping one)", int),
            ("HYMBA_SCAN_CHUNK", 64, lambda v: v > 0, "a positive int", int),
            ("HYMBA_CONV", 4, lambda v: v >= 0, "a number of taps >= 0 (0 = off)", int),
            ("HYMBA_WINDOW", 0, lambda v: v >= 0, "a number of tokens >= 0 (0 = full causal attention)", int),
        ]
        layers, ssm_heads, chunk, conv, window = (read(*row) for row in rows)
        return cls(ssm_heads, layers, chunk, conv, window)


# ----------------------------------------------------------------------------- the scan

def ssd_scan_reference(x: Tensor, log_a: Tensor, B: Tensor, C: Tensor,
                       initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence one step at a time (slow; for tests):  S_t = exp(log_a_t) S_{t-1} + x_t B_t^T,  y_t = S_t C_t.
    Same shapes and dtypes as ssd_scan."""
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    f32 = torch.promote_types(log_a.dtype, torch.float32)
    B, C = B.repeat_interleave(H // G, dim=2).to(f32), C.to(f32)  # (batch, T, H, N)
    S = torch.zeros(b, H, P, N, dtype=f32, device=x.device) if initial_state is None else initial_state.to(f32)
    ys = []
    for t in range(T):
        S = log_a[:, t, :, None, None].to(f32).exp() * S + x[:, t, :, :, None].to(f32) * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]))
    return torch.stack(ys, dim=1).to(x.dtype), S


def segsum(a: Tensor) -> Tensor:
    """(..., Q) -> (..., Q, Q) with [i, j] = a[j+1] + ... + a[i] for j <= i and -inf above the diagonal.
    Each entry sums only its own terms (no difference of running sums), so it is exact at any length and
    a = -inf (a state reset) gives -inf, never nan."""
    Q = a.size(-1)
    ones = torch.ones(Q, Q, dtype=torch.bool, device=a.device)
    terms = a[..., :, None].expand(*a.shape, Q).masked_fill(~ones.tril(-1), 0.0)  # [i, j] = a[i] where j < i
    return terms.cumsum(-2).masked_fill(~ones.tril(), -math.inf)


def ssd_scan(x: Tensor, log_a: Tensor, B: Tensor, C: Tensor, chunk_size: int = 64,
             initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan (Mamba-2) of  S_t = exp(log_a_t) S_{t-1} + x_t B_t^T,  y_t = S_t C_t.

    x (batch, T, H, P), already scaled by dt;  log_a (batch, T, H) <= 0, -inf where the state restarts;
    B (batch, T, G, N), where head h reads group h // (H/G);  C (batch, T, H, N);  initial_state
    (batch, H, P, N) or None for zeros. Returns y (batch, T, H, P) in x's dtype and the final state
    (batch, H, P, N) in fp32 (fp64 for fp64). Log-decays, their sums and exps are fp32, each a sum over its
    own range of log_a <= 0 (segsum), so every decay lies in [0, 1] at any length. Matmuls run in x's
    dtype, except the hand-over of states between chunks (step 3): that is the same recurrence over the
    chunks, solved by this function itself in fp32, so T/Q chunks cost T/Q * Q, not (T/Q)^2.
    """
    # axes: b batch, c chunk, l/s step in chunk (query/key), g group, r head in group, p head dim, n state
    b, T, H, P = x.shape
    G, N = B.shape[-2:]
    R, Q = H // G, chunk_size
    f32 = torch.promote_types(log_a.dtype, torch.float32)
    pad = -T % Q  # padded steps have a = 1 and no input: they change no output and not the final state
    x, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (x, B, C))
    c = (T + pad) // Q
    X, B, C = x.view(b, c, Q, G, R, P), B.view(b, c, Q, G, N), C.view(b, c, Q, G, R, N)
    A = F.pad(log_a.to(f32), (0, 0, 0, pad)).view(b, c, Q, G, R).permute(0, 3, 4, 1, 2)  # (b, g, r, c, l)
    A_seg = segsum(A)  # (b, g, r, c, l, s): log-decay from step s to step l of a chunk
    A_in = A[..., :1] + A_seg[..., 0]  # (b, g, r, c, l): log-decay from the chunk start through step l
    to_steps = lambda d: d.permute(0, 3, 4, 1, 2)[..., None].to(x.dtype)  # (b, g, r, c, l) -> (b, c, l, g, r, 1)

    # 1. outputs from inputs of the same chunk: (C B^T * L) X with the decay mask L = exp(segsum(A))
    CB = torch.einsum("bclgrn,bcsgn->bgrcls", C, B)
    Y_diag = torch.einsum("bgrcls,bcsgrp->bclgrp", CB * torch.exp(A_seg).to(x.dtype), X)

    # 2. each chunk's own final state: sum over steps s of exp(A summed over (s, chunk end]) X_s B_s^T
    states = torch.einsum("bcsgn,bcsgrp->bcgrpn", B, X * to_steps(torch.exp(A_seg[..., -1, :])))

    # 3. the state carried into each chunk: S_z = exp(A summed over chunk z) S_{z-1} + states_z, in fp32
    S0 = torch.zeros(b, H, P, N, dtype=f32, device=x.device) if initial_state is None else initial_state.to(f32)
    states = states.to(f32).reshape(b, c, H, P * N)
    totals = A_in[..., -1].permute(0, 3, 1, 2).reshape(b, c, H)
    if c == 1:
        ends, final = None, (totals[:, 0, :, None].exp() * S0.view(b, H, P * N) + states[:, 0])[..., None]
    else:
        ones = states.new_ones(b, c, 1, 1)
        inner = c if c <= Q else max(Q, 2)  # a single chunk when they fit: no padding to Q
        with torch.autocast(x.device.type, enabled=False):
            ends, final = ssd_scan(states, totals, ones, ones.expand(b, c, H, 1), inner, S0.view(b, H, P * N, 1))
    # cat, then cut to c: no tensor of c - 1 chunks, whose size 1 at c == 2 compile would guard on (a graph more)
    carried = S0.view(b, 1, H, P * N) if ends is None else torch.cat([S0.view(b, 1, H, P * N), ends], dim=1)[:, :c]

    # 4. outputs from the state carried into each chunk: exp(A summed over the chunk up to l) S_start C_l
    carried = carried.view(b, c, G, R, P, N).to(x.dtype)
    Y_off = torch.einsum("bclgrn,bcgrpn->bclgrp", C, carried) * to_steps(torch.exp(A_in))

    y = (Y_diag + Y_off).reshape(b, c * Q, H, P)[:, :T]
    return y.to(x.dtype), final.reshape(b, H, P, N)


# ----------------------------------------------------------------------------- hybrid heads

def segment_starts(cu_seqlens: Tensor, total: int) -> Tensor:
    """(1, total) bool, True at the first token of every segment of a packed row; cu_seqlens may repeat the
    total (empty padded segments). A scatter, not .tolist(): no host sync, so compile holds."""
    starts = torch.zeros(total + 1, dtype=torch.bool, device=cu_seqlens.device)
    return starts.scatter(0, cu_seqlens.long(), True)[None, :total]


def causal_conv(u: Tensor, weight: Tensor, starts: Tensor | None) -> Tensor:
    """Depthwise causal conv of u (batch, T, channels) with weight (channels, taps), tap 0 the current token;
    taps that would reach across a segment start (starts: (batch, T) bool) read zero."""
    taps, T = weight.size(1), u.size(1)
    seg = None if starts is None else starts.long().cumsum(1)  # segment number of each token
    out = u * weight[:, 0].to(u.dtype)
    for j in range(1, taps):  # a few taps, unrolled at trace time
        shifted = F.pad(u, (0, 0, j, 0))[:, :T]
        if seg is not None:
            shifted = shifted * (seg == F.pad(seg, (j, 0))[:, :T])[..., None].to(u.dtype)
        out = out + shifted * weight[:, j].to(u.dtype)
    return out


class HybridHeads(nn.Module):
    """The dynamics that make the last `heads` heads of a host attention layer SSD heads. Per SSM head h
    in KV group g (q, k, v as the host's kernel receives them):

        dt_t = softplus(w_h . v_{g,t} + dt_bias_h),   log a_t = -dt_t exp(A_log_h)   (-inf at a segment start)
        S_t = a_t S_{t-1} + (dt_t v_{g,t}) k_{g,t}^T,  y_t = rmsnorm(S_t q_{h,t} / sqrt(head_dim) + D_h v_{g,t})

    The output norm gives SSM heads the scale of attention heads (linear attention's sum is unnormalised)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, cfg: HymbaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.chunk, self.window = heads, kv_heads, cfg.scan_chunk, cfg.window
        self.group = heads // kv_heads  # query heads per KV head, the host layer's own
        self.carry: dict | None = None  # state kept between evaluation windows (carry_state), else None
        self.dt_weight = nn.Parameter(torch.zeros(heads, head_dim))  # zero: dt starts at softplus(dt_bias) everywhere
        # Mamba-2 inits: decay rates A = -exp(A_log) in [-16, -1], dt log-uniform in [1e-3, 1e-1]
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
        dt = torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt
        self.D = nn.Parameter(torch.ones(heads))
        self.conv_weight = None
        # (channel, tap) over the values only: q and k arrive rotated by RoPE, and taps per channel would not
        # commute with the rotation (the model would see absolute positions); identity at init
        if cfg.conv:
            self.conv_weight = nn.Parameter(F.pad(torch.ones(kv_heads * head_dim, 1), (0, cfg.conv - 1)))

    def forward(self, q: Tensor, k: Tensor, v: Tensor, starts: Tensor | None, carry: dict | None = None,
                scale: float | None = None) -> Tensor:
        """q (batch, T, heads, head_dim), k/v (batch, T, kv_heads, head_dim) -> (batch, T, heads, head_dim);
        starts (batch, T) bool where a document starts, or None. With `carry` (scoring window after window) the
        SSM state and the conv's last inputs come from the previous call and are left there for the next. `scale`
        multiplies q (the kernel's softmax scale; default 1 / sqrt(head_dim))."""
        b, t, h, d = q.shape
        carry = {} if carry is None else carry
        if self.conv_weight is not None:
            u, n = v.flatten(2), 0
            if "tail" in carry:  # the previous call's last inputs, so taps reach back across the call
                n = carry["tail"].size(1)
                u, starts = torch.cat([carry["tail"], u], 1), torch.cat([carry["tail_starts"], starts], 1)
            keep = u.size(1) - self.conv_weight.size(1) + 1
            carry["tail"], carry["tail_starts"] = u[:, keep:], None if starts is None else starts[:, keep:]
            v = causal_conv(u, self.conv_weight, starts)[:, n:].view(b, t, -1, d)
            starts = None if starts is None else starts[:, n:]
        v_heads = v.repeat_interleave(self.group, dim=2)  # (batch, T, heads, head_dim)
        f32 = torch.promote_types(v.dtype, torch.float32)
        dt = F.softplus((v_heads.to(f32) * self.dt_weight).sum(-1) + self.dt_bias)  # (batch, T, heads), fp32
        log_a = -dt * self.A_log.exp()
        if starts is not None:
            log_a = log_a.masked_fill(starts[..., None], -math.inf)
        C = q * (d ** -0.5 if scale is None else scale)
        y, carry["S"] = ssd_scan(v_heads * dt[..., None].to(v.dtype), log_a, k, C, self.chunk, carry.get("S"))
        return F.rms_norm(y + self.D.to(y.dtype)[:, None] * v_heads, (d,))


# ----------------------------------------------------------------------------- the kernel hook

def local_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float | None = None,
                    enable_gqa: bool = False) -> Tensor:
    """Causal attention over the last `window` keys (each query included), SDPA's layout (batch, heads, T,
    head_dim): the first `window` queries are plain causal attention; every later block of `window` queries
    attends to its own and the previous block's keys under one band mask. Time and memory are O(T window),
    never T x T, and 4-D inputs with one broadcast mask keep SDPA on its fused kernels."""
    b, h, T, d = q.shape
    W, sdpa = window, lambda *a, **kw: F.scaled_dot_product_attention(*a, **kw, scale=scale, enable_gqa=enable_gqa)
    first = sdpa(q[:, :, :W], k[:, :, :W], v[:, :, :W], is_causal=True)
    if T <= W:
        return first
    pad = -T % W
    n = (T + pad) // W
    # (batch, block, heads, W, head_dim)
    blocks = lambda t: F.pad(t, (0, 0, 0, pad)).view(b, t.size(1), n, W, d).transpose(1, 2)
    k, v = (torch.cat([blocks(t)[:, :-1], blocks(t)[:, 1:]], dim=3) for t in (k, v))  # previous block, own: 2W keys
    flat = lambda t: t.reshape(-1, *t.shape[2:])  # (batch * blocks after the first, heads, rows, head_dim)
    i, j = torch.arange(W, device=q.device)[:, None], torch.arange(2 * W, device=q.device)
    rel = j - W - i  # key position minus query position
    y = sdpa(flat(blocks(q)[:, 1:]), flat(k), flat(v), attn_mask=(rel <= 0) & (rel > -W))
    y = y.view(b, n - 1, h, W, d).transpose(1, 2).reshape(b, h, (n - 1) * W, d)
    return torch.cat([first, y], dim=2)[:, :, :T]


# the kernels' keywords a hybrid layer honours; any other keyword is refused (contract, point 2)
KERNEL_KWARGS = {"is_causal", "causal", "attn_mask", "dropout_p", "scale", "softmax_scale", "enable_gqa", "window_size",
                 "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"}


def refuse_kernel_call(kernel, args: tuple, kwargs: dict, q_heads: int, kv_heads: int, group: int) -> None:
    """One ValueError naming every part of a kernel call the hybrid heads cannot honour (group: query heads per KV
    head in the layer)."""
    causal = kwargs.get("is_causal", kwargs.get("causal", False))
    rows = [  # (what the call has, is it unsupported)
        ("a mask", kwargs.get("attn_mask") is not None),
        ("is_causal/causal False", not causal),
        (f"dropout_p={kwargs.get('dropout_p')}", bool(kwargs.get("dropout_p", 0.0))),
        ("a window", tuple(kwargs.get("window_size", (-1, -1))) != (-1, -1)),
        ("cu_seqlens_k unlike cu_seqlens_q", kwargs.get("cu_seqlens_k", None) is not kwargs.get("cu_seqlens_q", None)),
        ("extra positional arguments", bool(args)),
        (f"k/v of {kv_heads} heads for {q_heads} query heads where the layer shares each KV head among {group} (KV "
         "heads repeated before the kernel: pass the layer's own KV heads, e.g. SDPA with enable_gqa=True)",
         kv_heads * group != q_heads),
        *((f"keyword {name}", True) for name in sorted(set(kwargs) - KERNEL_KWARGS)),
    ]
    bad = [what for what, is_bad in rows if is_bad]
    if bad:
        raise ValueError(f"hymba_attention: {getattr(kernel, '__name__', kernel)} called with {', '.join(bad)}; hybrid "
                         "heads support causal attention without mask, dropout or window, one cu_seqlens for q and k, "
                         f"and only the keywords {', '.join(sorted(KERNEL_KWARGS))}")


def hymba_attention(layer: nn.Module, kernel, q: Tensor, k: Tensor, v: Tensor, *args, **kwargs):
    """The host's kernel call kernel(q, k, v, *args, **kwargs) for attention module `layer` (contract, point 2):
    unchanged where the layer is not hybrid, else attention heads through the kernel and SSM heads through
    the scan, in the kernel's own layout. A kernel that returns a tuple (FA3's (out, lse)) gets its first item
    extended by the SSM heads and the rest passed on (the lse covers the attention heads only)."""
    heads = getattr(layer, "hymba", None)
    if heads is None:
        return kernel(q, k, v, *args, **kwargs)
    sdpa = kernel is F.scaled_dot_product_attention
    packed = "cu_seqlens_q" in kwargs
    # the scan's layout (batch, T, heads, head_dim) from SDPA's (batch, heads, T, head_dim) or varlen's (T, heads, dim)
    to_scan = (lambda t: t.transpose(1, 2)) if sdpa else (lambda t: t[None]) if packed else (lambda t: t)
    from_scan = (lambda t: t.transpose(1, 2)) if sdpa else (lambda t: t[0]) if packed else (lambda t: t)
    head_axis = 1 if sdpa or packed else 2
    n_q, n_k = q.size(head_axis), k.size(head_axis)
    refuse_kernel_call(kernel, args, kwargs, n_q, n_k, heads.group)
    n_attn, n_kv = q.size(head_axis) - heads.heads, k.size(head_axis) - heads.kv_heads
    q_attn, k_attn, v_attn = (t.narrow(head_axis, 0, n) for t, n in ((q, n_attn), (k, n_kv), (v, n_kv)))
    scale = kwargs.get("scale", kwargs.get("softmax_scale"))
    carry = heads.carry
    starts = segment_starts(kwargs["cu_seqlens_q"], q.size(0)) if packed else None
    if carry is not None:
        starts = carry["starts"]
    if carry is not None:  # scoring with state (carry_state): dense rows only
        y_attn = from_scan(carried_attention(*map(to_scan, (q_attn, k_attn, v_attn)), heads.window, carry, scale))
    elif heads.window and sdpa:
        y_attn = local_attention(q_attn, k_attn, v_attn, heads.window, scale, kwargs.get("enable_gqa", False))
    else:  # FA3 takes the window itself: (left, right) tokens
        window = dict(window_size=(heads.window - 1, 0)) if heads.window else {}
        y_attn = kernel(q_attn, k_attn, v_attn, **{**kwargs, **window})
    rest = ()
    if isinstance(y_attn, tuple):
        y_attn, *rest = y_attn
    ssm_qkv = (to_scan(t.narrow(head_axis, n, t.size(head_axis) - n)) for t, n in ((q, n_attn), (k, n_kv), (v, n_kv)))
    y = torch.cat([y_attn, from_scan(heads(*ssm_qkv, starts, carry, scale)).to(y_attn.dtype)], dim=head_axis)
    return (y, *rest) if rest else y


# ----------------------------------------------------------------------------- scoring window after window

def carry_state(model: nn.Module, starts: Tensor | None) -> None:
    """Scoring with state (train_gpt.py's EVAL_CARRY_STATE): before each evaluation window, starts (batch, T)
    bool marks where documents start in it, and every hybrid layer keeps its SSM state, conv inputs and last
    window - 1 keys/values from the previous window of the same row (a document start restarts them);
    None switches it off and forgets all."""
    for block in model.blocks:
        heads = getattr(block.attn, "hymba", None)
        if heads is not None:
            heads.carry = None if starts is None else {**(heads.carry or {}), "starts": starts}


def carried_attention(q: Tensor, k: Tensor, v: Tensor, window: int, carry: dict, scale: float | None = None) -> Tensor:
    """Attention heads while scoring with state, (batch, T, heads, head_dim): each query sees the keys of its own
    document within the window, the previous window's last window - 1 keys included. Explicit masks (eval only)."""
    b, T = q.shape[:2]
    seg = carry.get("seg", q.new_zeros(b, dtype=torch.long))[:, None] + carry["starts"].long().cumsum(1)  # document
    k_seg = seg
    if "k" in carry:
        k, v, k_seg = (torch.cat([carry[name], t], 1) for name, t in (("k", k), ("v", v), ("k_seg", seg)))
    q_pos, k_pos = torch.arange(T, device=q.device)[:, None] + k.size(1) - T, torch.arange(k.size(1), device=q.device)
    mask = (k_pos <= q_pos) & (seg[:, :, None] == k_seg[:, None, :])
    if window:
        mask &= q_pos - k_pos < window
        keep = k.size(1) - window + 1
        carry["k"], carry["v"], carry["k_seg"] = k[:, keep:], v[:, keep:], k_seg[:, keep:]
    carry["seg"] = seg[:, -1]
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None],
                                       scale=scale, enable_gqa=k.size(2) != q.size(2))
    return y.transpose(1, 2)


# ----------------------------------------------------------------------------- swapping into a host

def extend_host_patterns(namespace: dict) -> None:
    """Append CONTROL_PATTERNS to the host's routing lists that exist (contract, point 3)."""
    for name in HOST_PATTERN_LISTS:
        value = namespace.get(name)
        if isinstance(value, (tuple, list)) and not all(p in value for p in CONTROL_PATTERNS):
            namespace[name] = type(value)([*value, *(p for p in CONTROL_PATTERNS if p not in value)])


def host_attention(model: nn.Module, i: int) -> nn.Module:
    """model.blocks[i].attn, checked against the contract; one line naming what is missing."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"hymba_layer: {type(model).__name__} has no .blocks; the contract needs model.blocks[i].attn")
    attn = getattr(blocks[i], "attn", None)
    where = f"model.blocks[{i}].attn"
    if attn is None:
        raise ValueError(f"hymba_layer: {where} is missing; the contract needs each block's attention module as .attn")
    missing = [a for a in ("num_heads", "num_kv_heads", "head_dim") if not isinstance(getattr(attn, a, None), int)]
    if missing:
        raise ValueError(f"hymba_layer: {where} ({type(attn).__name__}) lacks int attribute(s) {', '.join(missing)}")
    if attn.num_heads % attn.num_kv_heads or attn.num_kv_heads < 2:
        raise ValueError(f"hymba_layer: {where} has {attn.num_heads} heads and {attn.num_kv_heads} KV heads; hybrid "
                         "heads need num_heads a multiple of num_kv_heads and at least 2 KV heads (attention and SSM "
                         "heads each take whole KV groups)")
    if "hymba_attention" not in type(attn).forward.__code__.co_names:
        raise ValueError(f"hymba_layer: {type(attn).__name__}.forward does not call hymba_attention(self, kernel, q, "
                         "k, v, ...); run tools/patch_host.py on the script first")
    return attn


def build_and_swap_hymba_layers(model: nn.Module, log=None) -> list[int]:
    """Make model.blocks[i].attn hybrid for each i in HYMBA_LAYERS and return those indices; without
    HYMBA_LAYERS, change nothing and return []. A layer that is already hybrid is left as it is. Logs one line
    per layer through `log`, else the host module's own function `log` (so the line reaches its log file), else
    print on rank 0."""
    env = hymba_env()
    if "HYMBA_LAYERS" not in env:
        if env:
            raise ValueError(f"{', '.join(sorted(env))} set but HYMBA_LAYERS is empty: set HYMBA_LAYERS (e.g. 0) to "
                             "make layers hybrid, or unset them")
        return []
    first = host_attention(model, 0)
    cfg = HymbaConfig.from_env(first.num_heads, first.num_kv_heads, len(model.blocks))
    host = vars(sys.modules[type(model).__module__])
    if log is None:  # the host's own module-level log(msg) (the record families': rank 0, into its log file)
        own = host.get("log")
        log = own if getattr(own, "__module__", None) == type(model).__module__ else \
            print if os.environ.get("RANK", "0") == "0" else (lambda line: None)
    device = next(model.parameters()).device
    for i in cfg.layers:
        attn = host_attention(model, i)
        if getattr(attn, "hymba", None) is None:
            group = attn.num_heads // attn.num_kv_heads
            attn.hymba = HybridHeads(cfg.ssm_heads, cfg.ssm_heads // group, attn.head_dim, cfg).to(device)
        params = sum(p.numel() for p in attn.hymba.parameters())
        log(f"hymba:layer {i} attn_heads:{attn.num_heads - cfg.ssm_heads} ssm_heads:{cfg.ssm_heads} "
            f"kv_heads:{attn.num_kv_heads} head_dim:{attn.head_dim} chunk:{cfg.scan_chunk} conv:{cfg.conv} "
            f"window:{cfg.window} params:{params}")
    extend_host_patterns(host)
    return list(cfg.layers)
