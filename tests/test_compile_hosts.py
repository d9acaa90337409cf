"""The patched hosts compiled the way they compile on the GPU: torch.compile with its default backend (inductor,
which writes C++ on the CPU), fp32, checked against eager. Today's record (../shared/hosts/, tests/host_cpu.py's
copy): its model with fullgraph=True, dynamic=False on a packed row of several documents through the varlen hook,
and its LoRA TTT forward with dynamic=True over the record's chunk windows, its graphs counted; PR #1493's and the
root script's models; each with hybrid layers (head_dim 64). Graph breaks on each hook's hybrid path (root: SDPA,
PR #1493: FA3, record: varlen FA3) and in ssd_scan under a symbolic length are counted and must be zero.

Tolerances (fp32): a loss within 1e-5 relative, each gradient within 1e-4 of its own largest entry (measured:
~1e-6). The compiled models are built once per module; a cold inductor cache costs minutes (RESULTS.md,
"Compiled as the hosts compile")."""
import contextlib
import importlib.util
import os
import sys

import pytest
import torch
import torch._inductor.config
from torch._dynamo.utils import counters

import hymba_layer
from conftest import needs_inductor
from hosts import write_script

pytestmark = needs_inductor
VOCAB, DIM, HEADS, KV_HEADS = 1024, 256, 4, 2  # head_dim 64, as the hosts run; 2 KV groups: 2 attention + 2 SSM heads
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4


# ----------------------------------------------------------------------------- the hosts, imported

_loaded = {}  # host -> module: a host is imported once per process (the record registers torch custom ops)


@contextlib.contextmanager
def hymba_settings(**settings):
    """Exactly these HYMBA_* env vars while building a model."""
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("HYMBA_")]:
            mp.delenv(name)
        for name, value in settings.items():
            mp.setenv(name, str(value))
        yield


def load_host(name: str, tmp_path_factory):
    """The patched CPU copy of host `name` (hymba_layer.py inlined), imported as a module; skips where
    ../shared/hosts/ is absent. The copy registers its inlined module as sys.modules["hymba_layer"]; the
    repository's module is put back, so other tests import what they expect."""
    if name not in _loaded:
        path = write_script(tmp_path_factory.mktemp(f"compile_{name}") / f"{name}_patched_cpu.py", name, patched=True)
        spec = importlib.util.spec_from_file_location(f"compiled_host_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # the swap finds the host's routing lists through type(model).__module__
        try:
            spec.loader.exec_module(module)
        finally:
            sys.modules["hymba_layer"] = hymba_layer
        _loaded[name] = module
    return _loaded[name]


def hparams(module, **shape):
    h = module.Hyperparameters()
    for key, value in shape.items():
        assert hasattr(h, key), key
        setattr(h, key, value)
    return h


def jitter(model: torch.nn.Module, seed: int) -> None:
    """Noise on every parameter: the hosts zero-init their output projections (and the hybrid dt weights), so at
    init most gradients are zero and a compiled/eager comparison of them would prove nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def loss_and_grads(params: dict, run) -> tuple[torch.Tensor, dict]:
    for p in params.values():
        p.grad = None
    loss = run()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in params.items()}


def assert_close_to_eager(eager, compiled):
    (loss_e, grads_e), (loss_c, grads_c) = eager, compiled
    torch.testing.assert_close(loss_c, loss_e, rtol=LOSS_RTOL, atol=LOSS_RTOL * loss_e.abs().max().item())
    for name, g in grads_e.items():
        scale = g.abs().max().item()
        assert scale > 0, f"{name}: zero gradient in eager, nothing to compare"
        assert (grads_c[name] - g).abs().max().item() <= GRAD_RTOL * scale, name


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


# ----------------------------------------------------------------------------- today's record: training model

# 3 banked layers, blocks 1 (looped: runs twice) and 2 (parallel lanes) hybrid with the default conv taps,
# SmearGate, sparse head gate and XSA on as the record runs them; one packed row of 512 tokens
RECORD = dict(vocab_size=VOCAB, num_layers=3, model_dim=DIM, num_heads=HEADS, num_kv_heads=KV_HEADS, mlp_mult=2, rope_dims=16,
              train_seq_len=128, rope_train_seq_len=128, num_loops=1, loop_start=1, loop_end=1, parallel_start_layer=2,
              xsa_last_n=3, smear_gate_enabled=True, sparse_attn_gate_enabled=True)
ROW, DOC_STARTS = 512, [0, 50, 51, 200, 330]  # a 1-token document; documents over train_seq_len are cut at 128 by the host


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    return load_host("record", tmp_path_factory)


def record_batch(record, doc_starts, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(2, VOCAB, (1, ROW), generator=gen)
    x[0, doc_starts] = 1  # BOS, which the host's SmearGate reads
    y = torch.randint(0, VOCAB, (1, ROW), generator=gen)
    cu, _ = record._build_cu_seqlens(list(doc_starts), ROW, "cpu", RECORD["train_seq_len"], 64)  # the host's own, padded to 64
    return x, y, cu


def hybrid_record_gpt(record, h, layers: str = "0"):
    """The record's GPT in fp32 (the CPU copy's float for the host's bfloat16()) with `layers` hybrid, module defaults
    otherwise, seed 0."""
    torch.manual_seed(0)
    with hymba_settings(HYMBA_LAYERS=layers):
        model = record.GPT(h).float()
        record.restore_fp32_params(model)
        assert record.hymba_layer.build_and_swap_hymba_layers(model, log=lambda line: None) == \
            [int(i) for i in layers.split(",")]
    return model


@pytest.fixture(scope="module")
def record_model(record):
    h = hparams(record, **RECORD)
    model = hybrid_record_gpt(record, h, "1,2")
    jitter(model, 1)
    model.looping_active = True  # the record's second half of training: block 1 runs twice
    return h, model


@pytest.fixture(scope="module")
def record_compiled(record, record_model):
    """Eager and compiled loss and gradients on two packings (same shapes, different documents), and the number
    of graphs compiled for each."""
    h, model = record_model
    params = dict(model.named_parameters())
    compiled = torch.compile(model, dynamic=False, fullgraph=True)  # as the record's train_model
    runs, graphs = [], []
    for starts, seed in ((DOC_STARTS, 2), ([0, 10, 300, 301, 302], 3)):
        x, y, cu = record_batch(record, starts, seed)
        before = graphs_compiled()
        run = lambda m: loss_and_grads(params, lambda: m(x, y, cu_seqlens=cu, max_seqlen=h.train_seq_len))
        runs.append((run(model), run(compiled)))
        graphs.append(graphs_compiled() - before)
    return runs, graphs


def test_record_model_compiles_whole_and_matches_eager_on_packed_documents(record_compiled):
    runs, graphs = record_compiled
    for eager, compiled in runs:
        assert_close_to_eager(eager, compiled)
    assert any(".hymba." in name for name in runs[0][0][1])
    # one graph for every packing of the row: cu_seqlens' values (the document boundaries) are data, not guards
    assert graphs == [1, 0]


def test_packed_documents_are_attended_separately(record, record_model):
    """The comparison above is on a row the hybrid heads see as documents: one document over the whole row
    gives another loss (eager)."""
    h, model = record_model
    x, y, cu = record_batch(record, DOC_STARTS, 2)
    one_doc = record._build_cu_seqlens([0], ROW, "cpu", ROW, 64)[0]
    with torch.no_grad():
        packed, whole = (model(x, y, cu_seqlens=c, max_seqlen=ROW).item() for c in (cu, one_doc))
    assert abs(packed - whole) > 1e-3


# ----------------------------------------------------------------------------- today's record: LoRA TTT

# 1 hybrid layer on the TTT's LoRA path (_block_with_lora; the parallel one hooks FA3 the same way), LoRA rank 4
# on 2 documents: one layer because each graph costs minutes with a cold inductor cache. Lengths: the record's
# chunk windows (multiples of TTT_CHUNK_SIZE=48 up to TTT_EVAL_SEQ_LEN=2048): with the scan's chunk of 64,
# 48 tokens are one chunk (c == 1), the rest several.
TTT = dict(RECORD, num_layers=1, num_loops=0, parallel_start_layer=0, xsa_last_n=1)
TTT_LENGTHS, TTT_GRAPHS = (48, 96, 144, 2048), [1, 1, 0, 1]  # graphs compiled at each length


# CPU workaround, scoped to these graphs: inductor's vectorized C++ (cpp.simdlen default) corrupts the heap in the
# hybrid layer's compiled backward from T=96 (2+ scan chunks) on: "corrupted size vs. prev_size" / "double free or
# corruption" aborts the process (torch 2.13.0+cpu). HybridHeads alone reproduces it; backend="aot_eager" (same
# graphs, no inductor codegen) and inductor with cpp.simdlen=1 (no vectorization) run it as eager at T=48, 96, 200
# (bench/repro_ttt_compile.py; RESULTS.md, "Compiled as the hosts compile"). An inductor CPU codegen bug, not our
# graph; this evidence says nothing about the GPU (Triton) path.
TTT_CPU_WORKAROUND = {"cpp.simdlen": 1}


@pytest.fixture(scope="module")
def record_ttt(record):
    """Per length: eager and compiled per-token losses with the LoRA gradients, and the graphs compiled."""
    h = hparams(record, **TTT)
    model = hybrid_record_gpt(record, h)
    jitter(model, 4)
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.blocks:  # as the record before TTT: the rotary cache covers every window
        block.attn.rotary(max(TTT_LENGTHS), "cpu", torch.float32)
    lora = record.BatchedTTTLoRA(2, model, 4)
    jitter(lora, 5)  # B starts at zero
    params = dict(lora.named_parameters())
    forward = lambda input_ids, target_ids, lora: model.forward_ttt(input_ids, target_ids, lora=lora)
    compiled = torch.compile(forward, dynamic=True)  # as the record's _fwd_ttt
    out, gen = [], torch.Generator().manual_seed(6)
    with torch._inductor.config.patch(TTT_CPU_WORKAROUND):  # scoped; compiles happen at the calls (fwd, bwd)
        for T in TTT_LENGTHS:
            x, y = (torch.randint(0, VOCAB, (2, T), generator=gen) for _ in range(2))
            before = graphs_compiled()
            per_token = {}

            def run(f):
                per_token[f] = f(x, y, lora)
                return per_token[f][:, :48].mean(-1).sum()  # the record's step: the chunk's mean loss per document
            eager, comp = (loss_and_grads(params, lambda: run(f)) for f in (forward, compiled))
            out.append((T, per_token[forward].detach(), per_token[compiled].detach(), eager, comp, graphs_compiled() - before))
    return out


def test_record_ttt_compiles_dynamic_and_matches_eager_at_every_length(record_ttt):
    for T, tokens_e, tokens_c, eager, compiled, _ in record_ttt:
        assert tokens_c.shape == (2, T)
        torch.testing.assert_close(tokens_c, tokens_e, rtol=LOSS_RTOL, atol=LOSS_RTOL * tokens_e.abs().max().item())
        assert_close_to_eager(eager, compiled)


def test_record_ttt_compiles_two_graphs_for_all_its_windows(record_ttt):
    """The bound: one graph for T <= 64 (one scan chunk); for 64 < T <= 4096 (the chunks' hand-over is one chunk of
    chunks) one where T is padded to a multiple of 64 and one where it is not (the output's layout differs:
    a guard on T % 64 == 0; measured with TORCH_LOGS=recompiles): 3 for every TTT window the record makes
    (48..2048). A guard on T itself would show here as a graph per length (c - 1 chunks of size 1 at T=96 once
    made 144 compile again: ssd_scan's hand-over now cuts to c instead)."""
    assert [graphs for *_, graphs in record_ttt] == TTT_GRAPHS


# ----------------------------------------------------------------------------- PR #1493 and the root script

PR1493 = dict(vocab_size=VOCAB, num_layers=2, model_dim=DIM, embedding_dim=DIM, num_heads=HEADS, num_kv_heads=KV_HEADS,
              mlp_mult=2, rope_dims=16, train_seq_len=256, rope_train_seq_len=256, num_loops=0, parallel_residual_start=1,
              xsa_last_n=2)
ROOT = dict(vocab_size=VOCAB, num_layers=2, model_dim=DIM, num_heads=HEADS, num_kv_heads=KV_HEADS, mlp_mult=2)


def build_pr1493(module):
    return module.GPT(hparams(module, **PR1493))


def build_root(module):
    h = hparams(module, **ROOT)
    return module.GPT(vocab_size=h.vocab_size, num_layers=h.num_layers, model_dim=h.model_dim, num_heads=h.num_heads,
                      num_kv_heads=h.num_kv_heads, mlp_mult=h.mlp_mult, tie_embeddings=h.tie_embeddings,
                      tied_embed_init_std=h.tied_embed_init_std, logit_softcap=h.logit_softcap, rope_base=h.rope_base,
                      qk_gain_init=h.qk_gain_init)


@pytest.fixture(scope="module")
def dense_models(tmp_path_factory):
    """host -> its model in fp32 with block 1 hybrid (PR #1493: the parallel-residual block, FA3 stand-in; root: SDPA)."""
    models = {}
    for name, build in (("pr1493", build_pr1493), ("root", build_root)):
        module = load_host(name, tmp_path_factory)
        torch.manual_seed(0)
        with hymba_settings(HYMBA_LAYERS="1"):
            model = build(module).float()
            assert module.hymba_layer.build_and_swap_hymba_layers(model, log=lambda line: None) == [1]
        jitter(model, 7)
        models[name] = model
    return models


@pytest.mark.parametrize("name", ["pr1493", "root"])
def test_dense_host_compiles_whole_and_matches_eager(dense_models, name):
    model = dense_models[name]
    gen = torch.Generator().manual_seed(8)
    x, y = (torch.randint(0, VOCAB, (2, 256), generator=gen) for _ in range(2))
    params = dict(model.named_parameters())
    compiled = torch.compile(model, dynamic=False, fullgraph=True)  # as both hosts
    before = graphs_compiled()
    eager, comp = (loss_and_grads(params, lambda: m(x, y)) for m in (model, compiled))
    assert graphs_compiled() - before == 1
    assert_close_to_eager(eager, comp)


# ----------------------------------------------------------------------------- graph breaks on the hybrid path

def traced(fn, **compile_kwargs):
    """fn under dynamo without fullgraph (a break is counted, not raised), each graph run eagerly; returns the
    compiled callable and the list its graphs are appended to."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    return torch.compile(fn, backend=backend, **compile_kwargs), graphs


def new_breaks(before: dict) -> dict:
    """Graph breaks (reason -> count) since the snapshot `before` of counters["graph_break"]."""
    return {reason: n - before.get(reason, 0) for reason, n in counters["graph_break"].items() if n != before.get(reason, 0)}


def hybrid_attention_call(name, request):
    """(a hybrid layer's attention module, its arguments) as the host calls it in training."""
    gen = torch.Generator().manual_seed(9)
    if name == "record":  # packed documents: varlen FA3
        h, model = request.getfixturevalue("record_model")
        _, _, cu = record_batch(request.getfixturevalue("record"), DOC_STARTS, 9)
        q_w, k_w, v_w, out_w, _, _ = model._bank_weights(1)
        return model.blocks[1].attn, (torch.randn(1, ROW, DIM, generator=gen), q_w, k_w, v_w, out_w), dict(cu_seqlens=cu, max_seqlen=h.train_seq_len)
    return request.getfixturevalue("dense_models")[name].blocks[1].attn, (torch.randn(2, 256, DIM, generator=gen),), {}


@pytest.mark.parametrize("name", ["record", "pr1493", "root"])
def test_no_graph_break_on_the_hybrid_path(name, request):
    """One hybrid layer's attention as dynamo sees it (the hook, the host's kernel for the attention heads, the
    scan for the SSM heads): one graph, no break (under the hosts' fullgraph=True a break is a crash)."""
    layer, args, kwargs = hybrid_attention_call(name, request)
    assert layer.hymba is not None
    compiled, graphs = traced(layer, dynamic=False)
    before = dict(counters["graph_break"])
    compiled(*args, **kwargs)
    assert new_breaks(before) == {} and len(graphs) == 1


def test_ssd_scan_traces_whole_under_a_symbolic_length():
    """ssd_scan alone, dynamic=True, chunk 16: one chunk (T <= 16, c == 1), several (c > 1: the hand-over is
    ssd_scan over the chunks) and more than 16 (the hand-over recurses once more). No graph break at any length;
    a new graph only where the number of recursion levels changes, never for a new T; outputs as eager."""
    scan = lambda x, log_a, B, C, s0: hymba_layer.ssd_scan(x, log_a, B, C, 16, s0)
    compiled, graphs = traced(scan, dynamic=True)
    gen = torch.Generator().manual_seed(10)
    before, seen = dict(counters["graph_break"]), []
    for T in (12, 16, 40, 56, 300, 340):
        x, C = torch.randn(2, T, 4, 8, generator=gen), torch.randn(2, T, 4, 6, generator=gen)
        B, s0 = torch.randn(2, T, 2, 6, generator=gen), torch.randn(2, 4, 8, 6, generator=gen)
        log_a = -torch.rand(2, T, 4, generator=gen)
        y, s = compiled(x, log_a, B, C, s0)
        y_eager, s_eager = hymba_layer.ssd_scan(x, log_a, B, C, 16, s0)
        torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s, s_eager, rtol=1e-5, atol=1e-5)
        seen.append(len(graphs))
    assert new_breaks(before) == {}
    assert seen == [1, 1, 2, 2, 3, 3]
