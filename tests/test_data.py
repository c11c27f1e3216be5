"""DATA LOADING: shard format, header validation, shard discovery, the token stream and the distributed loader."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

import train_gpt as tg
from conftest import shard
from scripts import demo


def header_ints(magic=tg.SHARD_MAGIC, version=tg.SHARD_VERSION, count=0) -> bytes:
    h = np.zeros(tg.SHARD_HEADER_INTS, dtype="<i4")
    h[:3] = (magic, version, count)
    return h.tobytes()


# ---------------------------------------------------------------- round trip


def test_write_read_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 65536, size=1237).astype(np.uint16)
    tokens[:3] = (0, 65535, 1)  # the extremes of uint16 survive
    path = tmp_path / "fineweb_train_000000.bin"
    demo.write_data_shard(path, tokens)

    assert path.stat().st_size == tg.SHARD_HEADER_BYTES + 2 * len(tokens)
    raw_header = np.fromfile(path, dtype="<i4", count=3)
    assert raw_header.tolist() == [tg.SHARD_MAGIC, tg.SHARD_VERSION, len(tokens)]
    assert tg.read_shard_header(path) == len(tokens)

    loaded = tg.load_data_shard(path)
    assert isinstance(loaded, torch.Tensor)
    assert loaded.dtype == torch.int32  # int32, so ids >= 32768 are not negative
    assert loaded.numel() == len(tokens)
    np.testing.assert_array_equal(loaded.numpy(), tokens.astype(np.int64))


def test_body_is_little_endian_uint16_after_1024_byte_header(tmp_path):
    path = shard(tmp_path / "s.bin", [1, 258, 65534])
    body = path.read_bytes()[tg.SHARD_HEADER_BYTES:]
    assert body == bytes([1, 0, 2, 1, 254, 255])


# ---------------------------------------------------------------- header errors name the file


def test_missing_file(tmp_path):
    path = tmp_path / "fineweb_val_000000.bin"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        tg.read_shard_header(path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        tg.load_data_shard(path)


@pytest.mark.parametrize("content,word", [
    (header_ints(count=1)[:500], "header"),  # shorter than the header
    (header_ints(magic=12345, count=2) + b"\x00" * 4, "magic"),
    (header_ints(version=2, count=2) + b"\x00" * 4, "version"),
])
def test_bad_header_names_the_file_and_the_fault(tmp_path, content, word):
    path = tmp_path / f"{word}.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path))) as exc:
        tg.read_shard_header(path)
    assert word in str(exc.value)


@pytest.mark.parametrize("body_bytes", [0, 2 * 9, 2 * 10 + 1, 2 * 11, 2 * 10 + 4096])
def test_size_not_matching_token_count(tmp_path, body_bytes):
    """Header promises 10 tokens: an empty, truncated, odd-sized or over-long body is rejected."""
    path = tmp_path / "size.bin"
    path.write_bytes(header_ints(count=10) + b"\x01" * body_bytes)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        tg.read_shard_header(path)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        tg.load_data_shard(path)


def test_zero_token_count_rejected(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(header_ints(count=0))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        tg.read_shard_header(path)


def test_exact_size_accepted(tmp_path):
    path = tmp_path / "ok.bin"
    path.write_bytes(header_ints(count=10) + b"\x01" * 20)
    assert tg.read_shard_header(path) == 10


# ---------------------------------------------------------------- find_shards


def test_find_shards_no_match(tmp_path):
    shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3])  # another split does not count
    with pytest.raises(FileNotFoundError) as exc:
        tg.find_shards(str(tmp_path), "val")
    assert "fineweb_val_" in str(exc.value)


def test_find_shards_sorted(tmp_path):
    for i in (2, 0, 10, 1):
        shard(tmp_path / f"fineweb_train_{i:06d}.bin", [i + 1])
    shard(tmp_path / "fineweb_val_000000.bin", [7])
    files = tg.find_shards(str(tmp_path), "train")
    assert [p.rsplit("_", 1)[1] for p in files] == ["000000.bin", "000001.bin", "000002.bin", "000010.bin"]


def test_find_shards_validates_every_shard(tmp_path):
    shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3])
    bad = tmp_path / "fineweb_train_000001.bin"
    bad.write_bytes(header_ints(count=5) + b"\x00" * 8)  # truncated body
    shard(tmp_path / "fineweb_train_000002.bin", [4, 5])
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        tg.find_shards(str(tmp_path), "train")


def test_load_validation_tokens_concatenates_and_truncates(tmp_path):
    shard(tmp_path / "fineweb_val_000000.bin", [1, 2, 3])
    shard(tmp_path / "fineweb_val_000001.bin", [4, 5])
    np.testing.assert_array_equal(tg.load_validation_tokens(str(tmp_path)), [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(tg.load_validation_tokens(str(tmp_path), max_tokens=4), [1, 2, 3, 4])


# ---------------------------------------------------------------- TokenStream


def test_token_stream_wraps_across_shards_in_order(tmp_path):
    a, b, c = np.arange(10, 17), np.arange(20, 23), np.arange(30, 35)
    files = [str(shard(tmp_path / f"fineweb_train_00000{i}.bin", t)) for i, t in enumerate((a, b, c))]
    stream = tg.TokenStream(files, vocab_size=64)
    sizes = [4, 1, 9, 2, 15, 3, 7]
    got = np.concatenate([stream.take(n).numpy() for n in sizes])
    cycle = np.concatenate((a, b, c))
    expected = np.resize(cycle, sum(sizes))  # np.resize repeats the cycle
    np.testing.assert_array_equal(got, expected)
    # each take returns exactly n tokens
    assert all(stream.take(n).numel() == n for n in (1, 5, 15, 31))


def test_token_stream_rejects_out_of_vocab_shard(tmp_path):
    good = shard(tmp_path / "fineweb_train_000000.bin", [1, 2, 3])
    bad = shard(tmp_path / "fineweb_train_000001.bin", [4, 100, 5])
    stream = tg.TokenStream([str(good), str(bad)], vocab_size=100)
    assert stream.take(3).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=re.escape(str(bad))) as exc:
        stream.take(1)  # the second shard is checked when the stream reaches it
    assert "100" in str(exc.value)
    # the same shard is fine with a vocabulary that contains id 100
    stream = tg.TokenStream([str(good), str(bad)], vocab_size=101)
    assert stream.take(6).tolist() == [1, 2, 3, 4, 100, 5]


def test_check_token_range():
    tg.check_token_range(np.array([0, 5, 127]), 128, "x")
    with pytest.raises(ValueError, match="128") as exc:
        tg.check_token_range(np.array([0, 128, 3]), 128, "the thing")
    assert "the thing" in str(exc.value)


# ---------------------------------------------------------------- DistributedTokenLoader


def test_distributed_loader_disjoint_spans_and_shift(tmp_path):
    tokens = np.arange(1000) % 50000  # value == position, so spans are visible in the batches
    files = [str(shard(tmp_path / "fineweb_train_000000.bin", tokens))]
    seqs, seq_len, world = 3, 8, 2
    per_rank = seqs * seq_len + 1
    loaders = [tg.DistributedTokenLoader(files, 50000, r, world, torch.device("cpu")) for r in range(world)]
    for call in range(3):
        spans = []
        for rank, loader in enumerate(loaders):
            x, y = loader.next_batch(seqs, seq_len)
            assert x.shape == y.shape == (seqs, seq_len)
            assert x.dtype == y.dtype == torch.int64
            flat_x, flat_y = x.reshape(-1), y.reshape(-1)
            assert torch.equal(flat_y[:-1], flat_x[1:])  # targets are the inputs shifted by one
            assert int(flat_y[-1]) == int(flat_x[-1]) + 1
            start = call * world * per_rank + rank * per_rank
            assert torch.equal(flat_x, torch.arange(start, start + per_rank - 1))
            spans.append(set(range(start, start + per_rank)))
        assert not spans[0] & spans[1]


def test_write_rejects_ids_outside_uint16(tmp_path):
    for bad in (np.array([1, 70000]), np.array([-1, 5])):
        with pytest.raises(ValueError, match="uint16"):
            demo.write_data_shard(tmp_path / "fineweb_train_000000.bin", bad)
    assert not (tmp_path / "fineweb_train_000000.bin").exists()


# ---------------------------------------------------------------- training data must not hold validation documents


def documents(seed: int, n: int, bos: int = 1) -> np.ndarray:
    """n BOS-opened documents of 40-120 random tokens."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.concatenate(([bos], rng.integers(4, 500, rng.integers(40, 120)))) for _ in range(n)])


def test_overlap_of_disjoint_data_is_zero(tmp_path):
    val = documents(1, 50)
    train = [str(shard(tmp_path / f"fineweb_train_{i:06d}.bin", documents(10 + i, 300))) for i in range(2)]
    checked, found, runs = tg.val_documents_in_train(train, val, bos_id=1)
    assert found == runs == 0 and checked >= 2 * 290  # every whole document of both shards (the last of each is cut)


@pytest.mark.parametrize("how", ["copy", "hard link", "mixed in"])
def test_validation_documents_among_the_training_shards_are_found(tmp_path, how):
    """A copied or linked validation shard, or validation documents mixed into a training shard (as a
    data-preparation default once did), is caught by content, not by path."""
    val = documents(1, 50)
    val_path = shard(tmp_path / "fineweb_val_000000.bin", val)
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    clean = shard(train_dir / "fineweb_train_000000.bin", documents(10, 300))
    leaked = train_dir / "fineweb_train_000001.bin"
    if how == "copy":
        leaked.write_bytes(val_path.read_bytes())
    elif how == "hard link":
        os.link(val_path, leaked)
    else:
        shard(leaked, np.concatenate((documents(11, 100), val[val.tolist().index(1, 500):], documents(12, 100))))
    checked, found, runs = tg.val_documents_in_train([str(clean), str(leaked)], tg.load_data_shard(val_path).numpy(),
                                                     1)
    assert found >= 10 and runs >= 9 and checked > found


def test_single_validation_documents_among_training_ones_are_counted_but_form_no_run(tmp_path):
    val = documents(1, 50)
    starts = [i for i, tok in enumerate(val.tolist()) if tok == 1] + [len(val)]
    docs = [val[a:b] for a, b in zip(starts, starts[1:])]
    parts = []
    for k, doc in enumerate(docs[::7]):  # validation documents 0, 7, 14, ... each between training ones
        parts += [documents(30 + k, 20), doc]
    path = shard(tmp_path / "fineweb_train_000000.bin", np.concatenate(parts + [documents(99, 5)]))
    checked, found, runs = tg.val_documents_in_train([str(path)], val, 1)
    assert found == len(docs[::7]) and runs == 0


def test_a_run_cut_by_one_window_is_counted_in_the_next(tmp_path, monkeypatch):
    """Windows overlap in a short shard: the first holds validation document a whole and cuts b, the second holds
    both. The run a, b is counted once."""
    monkeypatch.setattr(tg, "OVERLAP_WINDOW_TOKENS", 190)
    monkeypatch.setattr(tg, "OVERLAP_WINDOWS", 3)
    rng = np.random.default_rng(5)

    def doc(n: int) -> np.ndarray:
        return np.concatenate(([1], rng.integers(4, 500, n - 1)))

    a, b = doc(50), doc(50)
    val = np.concatenate((doc(60), a, b, doc(60)))
    train = np.concatenate((doc(100), a, b, doc(120)))  # windows [0, 190), [65, 255), [130, 320)
    path = shard(tmp_path / "fineweb_train_000000.bin", train)
    assert tg.val_documents_in_train([str(path)], val, 1) == (3, 2, 1)


def test_the_overlap_check_samples_a_long_shard_at_its_start_middle_and_end(tmp_path, monkeypatch):
    monkeypatch.setattr(tg, "OVERLAP_WINDOW_TOKENS", 700)
    monkeypatch.setattr(tg, "OVERLAP_WINDOWS", 3)
    val = documents(1, 30)
    filler = [documents(20 + i, 100) for i in range(6)]
    for where in range(3):  # the leaked documents sit at the start, in the middle or at the end of the shard
        parts = list(filler)
        parts.insert([0, 3, 6][where], val)
        path = shard(tmp_path / f"fineweb_train_{where:06d}.bin", np.concatenate(parts))
        checked, found, runs = tg.val_documents_in_train([str(path)], val, 1)
        assert found >= 3 and runs >= 2 and checked < 100, (where, checked, found)  # samples, not the whole shard
