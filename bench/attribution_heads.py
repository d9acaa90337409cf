"""train_gpt.py with the hybrid layer's SSM heads replaced by one of the attribution table's other head forms
(bench/bench_quality.py runs it for the configurations that set BENCH_HEADS; RESULTS.md "Attribution").

    BENCH_HEADS=control  HYMBA_LAYERS=0 python3 bench/attribution_heads.py   # the control: no SSM at all
    BENCH_HEADS=parallel HYMBA_LAYERS=0 python3 bench/attribution_heads.py   # Hymba's parallel form

control: the same heads stay softmax attention (causal SDPA, the host's scale; on packed documents each token sees
    its own document only, as the host's varlen kernel does), with the same causal depthwise taps (HYMBA_CONV,
    identity at init, restarting at each document) on their values: the SSM heads' conv without the SSM. What the
    SSM heads add over this row is what the scan buys. bench/bench_hosts.py inlines it into the record's copy.
parallel: Hymba's own form on the same heads: softmax attention and the SSM both read those heads' q/k/v (the
    values after the taps when HYMBA_CONV > 0), each output RMS-normalised, then mixed by learned per-head weights
    (1 at init) and halved: y = (beta_attn rmsnorm(attn) + beta_ssm rmsnorm(ssm)) / 2.

Everything else (HYMBA_* parsing, the hook, the optimizer routing, export, scoring) is the module's and the host's
own: the variants only subclass HybridHeads and put the subclass where build_and_swap_hymba_layers looks it up.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchkit import ROOT  # first: it sets the import paths  # noqa: F401

import hymba_layer
import train_gpt


def conv_values(heads: hymba_layer.HybridHeads, v: Tensor, starts: Tensor | None) -> Tensor:
    """v (batch, T, kv_heads, head_dim) through the heads' taps (unchanged without taps)."""
    if heads.conv_weight is None:
        return v
    return hymba_layer.causal_conv(v.flatten(2), heads.conv_weight, starts).view_as(v)


def softmax_heads(q: Tensor, k: Tensor, v: Tensor, scale: float | None, starts: Tensor | None = None) -> Tensor:
    """Causal softmax attention in the scan's layout (batch, T, heads, head_dim), KV heads shared by groups;
    with `starts` (batch, T) bool, each query sees only keys of its own document."""
    mask, causal = None, True
    if starts is not None:
        doc = starts.cumsum(1)  # (batch, T): document number of each token
        T = q.size(1)
        same_doc = doc[:, :, None] == doc[:, None, :]
        mask, causal = (same_doc & torch.ones(T, T, dtype=torch.bool, device=q.device).tril())[:, None], False
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                       is_causal=causal, scale=scale, enable_gqa=q.size(2) != k.size(2))
    return y.transpose(1, 2)


class ControlHeads(hymba_layer.HybridHeads):
    """Softmax attention with the taps on its values; none of the SSM's dynamics."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, cfg: hymba_layer.HymbaConfig):
        super().__init__(heads, kv_heads, head_dim, cfg)
        self.dt_weight = self.A_log = self.dt_bias = self.D = None

    def forward(self, q, k, v, starts, carry=None, scale=None):
        if carry is not None:
            raise ValueError("BENCH_HEADS=control: no EVAL_CARRY_STATE (softmax heads carry no state)")
        return softmax_heads(q, k, conv_values(self, v, starts), scale, starts)


class ParallelHeads(hymba_layer.HybridHeads):
    """Hymba's parallel heads: normalised softmax attention and SSM outputs, mixed per head."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, cfg: hymba_layer.HymbaConfig):
        super().__init__(heads, kv_heads, head_dim, cfg)
        self.beta_attn, self.beta_ssm = nn.Parameter(torch.ones(heads)), nn.Parameter(torch.ones(heads))

    def forward(self, q, k, v, starts, carry=None, scale=None):
        if carry is not None or starts is not None:
            raise ValueError("BENCH_HEADS=parallel: dense rows without EVAL_CARRY_STATE only")
        y_ssm = super().forward(q, k, v, None, None, scale)  # rms-normed by the module
        y_attn = F.rms_norm(softmax_heads(q, k, conv_values(self, v, None), scale), (q.size(-1),))
        mix = lambda beta: beta.to(y_ssm.dtype)[:, None]  # (heads, 1) against (batch, T, heads, head_dim)
        return (mix(self.beta_attn) * y_attn.to(y_ssm.dtype) + mix(self.beta_ssm) * y_ssm) / 2


VARIANTS = {"control": ControlHeads, "parallel": ParallelHeads}

if __name__ == "__main__":
    name = os.environ.get("BENCH_HEADS", "")
    if name not in VARIANTS:
        sys.exit(f"attribution_heads.py: BENCH_HEADS={name!r}; valid: {', '.join(VARIANTS)}")
    hymba_layer.HybridHeads = VARIANTS[name]
    train_gpt.main()
