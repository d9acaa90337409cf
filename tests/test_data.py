"""Shards, the train token loader and validation tokens (golf_conventions 1.1, 1.4, 1.6)."""
import numpy as np
import pytest
import torch

import train_gpt
from conftest import write_shard


def test_shard_roundtrip_keeps_header_and_every_uint16_value(tmp_path):
    tokens = np.array([0, 1, 2, 1023, 1024, 40000, 65535], dtype=np.int64)
    path = write_shard(tmp_path / "fineweb_train_000000.bin", tokens)
    assert path.stat().st_size == 1024 + 2 * 7
    assert np.fromfile(path, dtype="<i4", count=3).tolist() == [20240520, 1, 7]
    assert train_gpt.read_shard_header(str(path)) == 7
    assert train_gpt.load_data_shard(str(path), 65536).tolist() == [0, 1, 2, 1023, 1024, 40000, 65535]


def test_empty_shard_loads_as_no_tokens(tmp_path):
    path = write_shard(tmp_path / "s.bin", np.array([], dtype=np.int64))
    assert train_gpt.load_data_shard(str(path), 1024).numel() == 0


@pytest.mark.parametrize("fields, expect", [
    (dict(magic=20240521), "not a challenge shard"),
    (dict(version=2), "not a challenge shard"),
    (dict(count=11), "does not match its header"),  # header claims one token more than the body holds
])
def test_bad_header_or_size_raises_naming_the_file(tmp_path, fields, expect):
    path = write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(10), **fields)
    with pytest.raises(ValueError, match=expect) as err:
        train_gpt.read_shard_header(str(path))
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match=expect):
        train_gpt.load_data_shard(str(path), 1024)


def test_truncated_body_raises_with_both_sizes(tmp_path):
    path = write_shard(tmp_path / "fineweb_train_000003.bin", np.arange(10))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"size 1043 bytes does not match its header \(10 tokens = 1044 bytes\)") as err:
        train_gpt.load_data_shard(str(path), 1024)
    assert str(path) in str(err.value)


def test_file_shorter_than_header_raises_naming_the_file(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    path.write_bytes(np.array([20240520, 1, 0], dtype="<i4").tobytes())
    with pytest.raises(ValueError, match="not a challenge shard") as err:
        train_gpt.read_shard_header(str(path))
    assert str(path) in str(err.value)


def test_token_id_at_vocab_size_raises_naming_file_and_id(tmp_path):
    path = write_shard(tmp_path / "fineweb_train_000000.bin", [5, 1024, 7])
    assert train_gpt.load_data_shard(str(path), 1025).tolist() == [5, 1024, 7]
    with pytest.raises(ValueError, match=r"token id 1024 >= VOCAB_SIZE=1024") as err:
        train_gpt.load_data_shard(str(path), 1024)
    assert str(path) in str(err.value)


def test_find_shards_sorts_matches_and_ignores_other_files(tmp_path):
    for i in (2, 0, 1):
        write_shard(tmp_path / f"fineweb_train_{i:06d}.bin", [i])
    write_shard(tmp_path / "fineweb_val_000000.bin", [9])
    found = train_gpt.find_shards(str(tmp_path / "fineweb_train_*.bin"))
    assert found == [str(tmp_path / f"fineweb_train_{i:06d}.bin") for i in range(3)]


def test_find_shards_with_no_match_raises_naming_the_pattern(tmp_path):
    pattern = str(tmp_path / "fineweb_train_*.bin")
    write_shard(tmp_path / "fineweb_val_000000.bin", [1])
    with pytest.raises(FileNotFoundError) as err:
        train_gpt.find_shards(pattern)
    assert pattern in str(err.value)


def test_find_shards_checks_every_header(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", [1, 2])
    bad = write_shard(tmp_path / "fineweb_train_000001.bin", [1, 2], version=0)
    with pytest.raises(ValueError) as err:
        train_gpt.find_shards(str(tmp_path / "fineweb_train_*.bin"))
    assert str(bad) in str(err.value)


# ----------------------------------------------------------------------------- DistributedTokenLoader

# Two shards of recognisable tokens: 0..39 then 100..129; the stream reads them in order and wraps.
SHARD0, SHARD1 = np.arange(0, 40), np.arange(100, 130)
STREAM = np.concatenate([SHARD0, SHARD1] * 4)


@pytest.fixture
def two_shards(tmp_path):
    write_shard(tmp_path / "fineweb_train_000000.bin", SHARD0)
    write_shard(tmp_path / "fineweb_train_000001.bin", SHARD1)
    return train_gpt.find_shards(str(tmp_path / "fineweb_train_*.bin"))


def loaders(files, world_size):
    return [train_gpt.DistributedTokenLoader(files, 1024, r, world_size, torch.device("cpu")) for r in range(world_size)]


def test_two_ranks_get_disjoint_contiguous_spans_with_shifted_targets(two_shards):
    # global 64 tokens, world 2, grad_accum 4: local 8 tokens, span 9; each call consumes 2*9 = 18 tokens
    ranks = loaders(two_shards, 2)
    for call in range(5):  # 90 tokens: past the end of shard 1 and back into shard 0
        for r, loader in enumerate(ranks):
            x, y = loader.next_batch(64, 4, 4)
            start = 18 * call + 9 * r
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, 4)
            assert x.flatten().tolist() == STREAM[start : start + 8].tolist()
            assert y.flatten().tolist() == STREAM[start + 1 : start + 9].tolist()


def test_loader_wraps_from_last_shard_to_shard_zero(two_shards):
    rank1 = loaders(two_shards, 2)[1]
    for _ in range(3):
        rank1.next_batch(64, 4, 4)
    x, y = rank1.next_batch(64, 4, 4)  # call 3, rank 1: stream tokens 63..71 = 123..129, 0, 1
    assert x.tolist() == [[123, 124, 125, 126], [127, 128, 129, 0]]
    assert y.tolist() == [[124, 125, 126, 127], [128, 129, 0, 1]]


def test_one_process_with_8_micro_steps_sees_the_same_step_as_two_ranks_with_4(two_shards):
    single = loaders(two_shards, 1)[0]
    seen_single = [tuple(t.flatten().tolist() for t in single.next_batch(64, 4, 8)) for _ in range(8)]
    ranks = loaders(two_shards, 2)
    seen_pair = [tuple(t.flatten().tolist() for t in loader.next_batch(64, 4, 4)) for _ in range(4) for loader in ranks]
    assert seen_pair == seen_single  # micro-step i of rank r is the single process's micro-step 2i+r


# ----------------------------------------------------------------------------- validation tokens

def test_validation_tokens_concatenate_shards_and_truncate_to_k_seq_len_plus_one(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(50))
    write_shard(tmp_path / "fineweb_val_000001.bin", np.arange(1000, 1030))
    val = train_gpt.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 16, 2048)
    assert val.dtype == torch.int64 and val.numel() == 65  # 80 tokens: (79 // 16) * 16 + 1
    assert val.tolist() == list(range(50)) + list(range(1000, 1015))


def test_validation_tokens_of_exactly_k_seq_len_plus_one_are_all_kept(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(33))
    assert train_gpt.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 16, 1024).numel() == 33


def test_validation_shorter_than_one_sequence_raises(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(16))
    with pytest.raises(ValueError, match=r"hold 16 tokens: need at least TRAIN_SEQ_LEN\+1=17"):
        train_gpt.load_validation_tokens(str(tmp_path / "fineweb_val_*.bin"), 16, 1024)
