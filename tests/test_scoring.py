"""Bits-per-byte scoring: the byte lookup tables and eval_val (golf_conventions 2.1-2.4)."""
import math
import types
import unicodedata

import numpy as np
import pytest
import torch
from torch import nn

import train_gpt
from conftest import corpus_docs, real_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(params=["self-trained-512", "fineweb-1024", "fineweb-8192"])
def any_sp(request):
    if request.param == "self-trained-512":
        return request.getfixturevalue("sp")
    return real_tokenizer(int(request.param.split("-")[1]))


def shard_stream(sp, docs) -> torch.Tensor:
    """Docs as the shards store them: [BOS] + encode(doc), packed back to back."""
    return torch.tensor([t for d in docs for t in [sp.bos_id()] + sp.encode(d)], dtype=torch.int64)


def target_bytes(sp, stream: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Bytes of each target y given its input x: base_bytes[y] + (has_leading_space[y] & ~is_boundary[x])."""
    base, space, boundary = train_gpt.build_sentencepiece_luts(sp, vocab_size or sp.vocab_size(), CPU)
    x, y = stream[:-1], stream[1:]
    return (base[y] + (space[y] & ~boundary[x])).long()


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


CLEAN_DOCS = [  # ASCII, single spaces, no leading/trailing whitespace: normalization changes nothing
    "Hello world, the 2024 results are in.",
    "Parameter Golf scores bits per byte on FineWeb; lower is better.",
    "x = 3.14159 and y = 42, so print(x * y) shows 131.94678.",
]


def test_clean_ascii_docs_count_exactly_their_utf8_bytes(any_sp):
    stream = shard_stream(any_sp, CLEAN_DOCS)
    assert sum(map(utf8_len, CLEAN_DOCS)) == 37 + 64 + 56
    assert int(target_bytes(any_sp, stream).sum()) == 157


@pytest.mark.parametrize("doc, normalized, counted", [
    ("a  b\n\nc   12345", "a b c 12345", 11),        # runs of spaces and newlines become one space
    ("  leading and trailing  \n", "leading and trailing", 20),  # stripped at both ends
    ("tabs\tand\r\nCRLF 007", "tabs and CRLF 007", 17),
])
def test_whitespace_counts_as_the_normalized_single_spaces(any_sp, doc, normalized, counted):
    assert any_sp.normalize(doc).replace("\u2581", " ") == normalized
    assert int(target_bytes(any_sp, shard_stream(any_sp, [doc])).sum()) == counted == utf8_len(normalized)


def test_non_ascii_doc_counts_its_nfkc_utf8_bytes_through_byte_fallback(any_sp):
    doc = "caf\u00e9 \uff21 \ufb01 \u2460 \u4e2d\u6587 \U0001F600"  # café, fullwidth A, fi ligature, circled 1, 中文, emoji
    nfkc = unicodedata.normalize("NFKC", doc)
    assert nfkc == "caf\u00e9 A fi 1 \u4e2d\u6587 \U0001F600" and utf8_len(doc) == 29 and utf8_len(nfkc) == 24
    stream = shard_stream(any_sp, [doc])
    assert any(any_sp.is_byte(int(t)) for t in stream)  # 中, 文 and the emoji are <0xNN> byte pieces
    assert int(target_bytes(any_sp, stream).sum()) == 24


def test_concatenated_prose_docs_count_their_normalized_utf8_bytes(any_sp):
    docs = corpus_docs()[:6]
    expected = sum(utf8_len(any_sp.normalize(d).replace("\u2581", " ")) for d in docs)
    assert expected > 20_000
    assert int(target_bytes(any_sp, shard_stream(any_sp, docs)).sum()) == expected


def test_leading_space_counts_one_byte_except_after_a_boundary(sp):
    the, a = sp.piece_to_id("\u2581the"), sp.piece_to_id("a")
    assert sp.id_to_piece(the) == "\u2581the" and sp.id_to_piece(a) == "a"
    bos, eos = sp.bos_id(), sp.eos_id()
    stream = torch.tensor([bos, the, a, the, eos, the])
    assert target_bytes(sp, stream).tolist() == [3, 1, 4, 0, 3]


def test_lookup_tables_mark_special_byte_and_space_pieces(sp):
    size = sp.vocab_size() + 5  # VOCAB_SIZE may exceed the tokenizer's: the extra ids are boundaries
    base, space, boundary = (t.tolist() for t in train_gpt.build_sentencepiece_luts(sp, size, CPU))
    assert len(base) == len(space) == len(boundary) == size
    for i in [0, 1, 2, 3] + list(range(sp.vocab_size(), size)):  # pad, bos, eos, unk, padding ids
        assert (base[i], space[i], boundary[i]) == (0, False, True)
    for b in range(256):
        i = sp.piece_to_id(f"<0x{b:02X}>")
        assert (base[i], space[i], boundary[i]) == (1, False, False)
    lone = sp.piece_to_id("\u2581")
    assert lone != sp.unk_id() and (base[lone], space[lone], boundary[lone]) == (0, True, False)
    the = sp.piece_to_id("\u2581the")
    assert (base[the], space[the], boundary[the]) == (3, True, False)


# ----------------------------------------------------------------------------- eval_val

class ConstantLoss(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, y):
        return torch.tensor(self.value)


class MeanTarget(nn.Module):
    """'Loss' = mean target id, so val_loss is the mean of the targets it was shown; checks x/y."""

    def __init__(self, seq_len: int):
        super().__init__()
        self.seq_len = seq_len

    def forward(self, x, y):
        assert x.shape == y.shape and x.shape[1] == self.seq_len
        assert torch.equal(x[:, 1:], y[:, :-1])
        return y.double().mean()


def eval_args(seq_len: int, val_batch_size: int, world_size: int = 1, rank: int = 0):
    return types.SimpleNamespace(train_seq_len=seq_len, val_batch_size=val_batch_size, world_size=world_size,
                                 rank=rank, grad_accum_steps=8 // world_size, distributed=False)


def test_eval_val_bpb_is_loss_over_ln2_times_tokens_per_byte(sp):
    docs = corpus_docs()[:3]
    tokens = shard_stream(sp, docs)
    targets = tokens.numel() - 1
    nbytes = sum(utf8_len(sp.normalize(d).replace("\u2581", " ")) for d in docs)
    luts = train_gpt.build_sentencepiece_luts(sp, sp.vocab_size(), CPU)
    # seq_len 1 keeps every token (numel = k*1 + 1); 8*1000 tokens per batch leaves a partial last batch
    args = eval_args(seq_len=1, val_batch_size=8 * 1000)
    assert targets % 1000 != 0
    val_loss, val_bpb = train_gpt.eval_val(args, ConstantLoss(2.75), CPU, tokens, luts)
    assert val_loss == 2.75
    assert val_bpb == pytest.approx(2.75 / math.log(2) * targets / nbytes, rel=1e-12, abs=0)


def test_eval_val_counts_no_space_byte_after_a_boundary(sp):
    the, a = sp.piece_to_id("\u2581the"), sp.piece_to_id("a")
    tokens = torch.tensor([sp.bos_id(), the, a, the, sp.eos_id(), the])  # target bytes 3, 1, 4, 0, 3
    luts = train_gpt.build_sentencepiece_luts(sp, sp.vocab_size(), CPU)
    val_loss, val_bpb = train_gpt.eval_val(eval_args(seq_len=5, val_batch_size=8 * 5), ConstantLoss(1.0), CPU, tokens, luts)
    assert val_bpb == pytest.approx(1.0 / math.log(2) * 5 / 11, rel=1e-12)


@pytest.mark.parametrize("val_batch_size", [8 * 16, 8 * 48, 8 * 10_000])  # 1 sequence, 3, all per batch
def test_eval_val_scores_every_target_once(sp, val_batch_size):
    tokens = shard_stream(sp, corpus_docs()[:2])
    seq_len = 16
    tokens = tokens[: (tokens.numel() - 1) // seq_len * seq_len + 1]
    luts = train_gpt.build_sentencepiece_luts(sp, sp.vocab_size(), CPU)
    val_loss, val_bpb = train_gpt.eval_val(eval_args(seq_len, val_batch_size), MeanTarget(seq_len), CPU, tokens, luts)
    assert val_loss == pytest.approx(tokens[1:].double().mean().item(), rel=1e-12)
    nbytes = int(target_bytes(sp, tokens).sum())
    assert val_bpb == pytest.approx(val_loss / math.log(2) * (tokens.numel() - 1) / nbytes, rel=1e-12)


def test_eval_val_gives_each_rank_a_contiguous_share_of_sequences(sp):
    seq_len = 16
    tokens = torch.arange(1, 7 * seq_len + 2)  # 7 sequences: rank 0 takes 0..2, rank 1 takes 3..6
    luts = train_gpt.build_sentencepiece_luts(sp, 10_000, CPU)
    means = [train_gpt.eval_val(eval_args(seq_len, 8 * seq_len, 2, r), MeanTarget(seq_len), CPU, tokens, luts)[0] for r in (0, 1)]
    assert means == [pytest.approx(np.mean(np.arange(2, 3 * 16 + 2))), pytest.approx(np.mean(np.arange(3 * 16 + 2, 7 * 16 + 2)))]


def test_val_batch_below_one_sequence_per_micro_step_is_rejected(hparams):
    with pytest.raises(ValueError, match=r"VAL_BATCH_SIZE=1016 is invalid: it must be at least 8\*TRAIN_SEQ_LEN=1024"):
        hparams(VAL_BATCH_SIZE=1016, TRAIN_SEQ_LEN=128)
    assert hparams(VAL_BATCH_SIZE=1024, TRAIN_SEQ_LEN=128).val_batch_size == 1024


# ----------------------------------------------------------------------------- scoring with the hybrid state carried

@pytest.fixture
def carried_model(monkeypatch):
    """A 2-block GPT whose blocks are both hybrid (attention heads on a 6-token window, conv taps): with the
    state carried, windows of 16 must score like one long pass over each document."""
    import hymba_layer
    monkeypatch.setattr(train_gpt, "CONTROL_TENSOR_NAME_PATTERNS", train_gpt.CONTROL_TENSOR_NAME_PATTERNS)
    for k, v in dict(HYMBA_LAYERS="0,1", HYMBA_WINDOW="6", HYMBA_CONV="3", HYMBA_SCAN_CHUNK="8").items():
        monkeypatch.setenv(k, v)
    torch.manual_seed(0)
    model = train_gpt.GPT(64, 2, 32, 4, 2, 2, True, 0.005, 30.0, 10000.0, 1.5)
    hymba_layer.build_and_swap_hymba_layers(model, lambda line: None)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", "dt_bias")):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def test_carried_state_scores_every_target_once_like_one_long_pass_per_document(hparams, carried_model):
    """Three documents (41, 33, 25 tokens: not multiples of the window) cut into 2 rows and scored 16 tokens at
    a time with the state carried, against one long forward pass over each document's inputs (its last target
    is the next document's BOS): loss and bpb within 1e-5, the bytes of every target counted once."""
    g = torch.Generator().manual_seed(2)
    docs = [torch.cat([torch.tensor([1]), torch.randint(3, 64, (n,), generator=g)]) for n in (40, 32, 24)]
    stream = torch.cat(docs)
    luts = (torch.randint(1, 4, (64,), generator=g), torch.rand(64, generator=g) < 0.5, torch.rand(64, generator=g) < 0.2)
    args = hparams(TRAIN_SEQ_LEN=16, VAL_BATCH_SIZE=256, HYMBA_LAYERS="0,1", EVAL_CARRY_STATE=1)  # 2 rows
    loss, bpb = train_gpt.eval_val_carried(args, carried_model, CPU, stream, luts, bos_id=1)
    starts = [0, 41, 74, stream.numel() - 1]
    total_loss = total_bytes = 0.0
    carried_model.eval()
    with torch.no_grad():
        for a, b in zip(starts, starts[1:]):
            x, y = stream[a:b], stream[a + 1 : b + 1]
            total_loss += carried_model(x[None], y[None]).item() * y.numel()
            total_bytes += (luts[0][y] + (luts[1][y] & ~luts[2][x])).sum().item()
    n = stream.numel() - 1
    assert abs(loss - total_loss / n) < 1e-5
    assert abs(bpb - total_loss / math.log(2) / total_bytes) < 1e-5
    assert all(getattr(b.attn.hymba, "carry", None) is None and b.attn.pos_offset == 0 for b in carried_model.blocks)  # switched off after


def test_carried_state_needs_hybrid_layers(hparams):
    with pytest.raises(ValueError, match="EVAL_CARRY_STATE=1 is invalid without HYMBA_LAYERS"):
        hparams(EVAL_CARRY_STATE=1)
