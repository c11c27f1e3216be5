"""TOKENIZER-AGNOSTIC EVALUATION: per-token byte counts (the bpb denominator), tokenizer loading, and evaluate()."""

from __future__ import annotations

import lzma
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

import train_gpt as tg
from scripts import demo
from conftest import NON_ASCII_DOCS

BOS, EOS, PAD, UNK = 1, 2, 0, 3


@pytest.fixture(scope="module")
def sp(small_sp):
    return spm.SentencePieceProcessor(model_file=small_sp)


@pytest.fixture(scope="module")
def luts(sp):
    return tg.build_sentencepiece_luts(sp)


def pid(sp, piece: str) -> int:
    i = sp.piece_to_id(piece)
    assert i != sp.unk_id(), f"test tokenizer lacks piece {piece!r}"
    return i


def counts(luts, ids) -> list[int]:
    return tg.target_byte_counts(np.asarray(ids, dtype=np.int64), luts).tolist()


def test_special_ids_of_test_tokenizer(sp):
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (PAD, BOS, EOS, UNK)


def test_lut_shapes_and_special_tokens(sp, luts):
    base, space, boundary = luts
    n = sp.vocab_size()
    assert base.shape == space.shape == boundary.shape == (n,)
    for special in (PAD, BOS, EOS, UNK):
        assert base[special] == 0 and not space[special] and boundary[special]
    # every ordinary piece is not a boundary
    assert not boundary[pid(sp, "a")] and not boundary[pid(sp, "▁the")] and not boundary[pid(sp, "<0x41>")]


def test_leading_space_not_counted_after_bos(sp, luts):
    the, a = pid(sp, "▁the"), pid(sp, "a")
    # "▁the" is 3 bytes of text plus a space
    assert counts(luts, [BOS, the]) == [3]
    assert counts(luts, [a, the]) == [4]
    assert counts(luts, [BOS, a, the, the]) == [1, 4, 4]


@pytest.mark.parametrize("prev", [BOS, EOS, PAD, UNK])
def test_control_and_unknown_tokens_are_boundaries(sp, luts, prev):
    the = pid(sp, "▁the")
    assert counts(luts, [prev, the]) == [3]


def test_control_and_unknown_targets_count_zero(sp, luts):
    a = pid(sp, "a")
    assert counts(luts, [a, BOS, EOS, PAD, UNK, a]) == [0, 0, 0, 0, 1]


def test_lone_space_piece(sp, luts):
    space, a = pid(sp, "▁"), pid(sp, "a")
    assert counts(luts, [a, space]) == [1]
    assert counts(luts, [BOS, space]) == [0]


def test_non_ascii_pieces_count_utf8_bytes(sp, luts):
    a = pid(sp, "a")
    assert counts(luts, [a, pid(sp, "é")]) == [2]
    assert counts(luts, [a, pid(sp, "ü")]) == [2]
    assert counts(luts, [a, pid(sp, "日")]) == [3]


def test_byte_fallback_pieces_count_one_byte_and_are_not_boundaries(sp, luts):
    byte_a, the = pid(sp, "<0x41>"), pid(sp, "▁the")
    assert counts(luts, [BOS, byte_a, the]) == [1, 4]


def test_sum_equals_utf8_length_of_ascii_documents(sp, luts):
    docs = demo.make_demo_text(40, seed=123)
    for doc in docs:
        assert doc.isascii()
        ids = [BOS] + sp.encode(doc)
        assert int(tg.target_byte_counts(np.asarray(ids), luts).sum()) == len(doc.encode("utf-8"))
    # a stream of documents, each after its BOS, as in the shards
    stream = [t for doc in docs for t in [BOS] + sp.encode(doc)]
    assert int(tg.target_byte_counts(np.asarray(stream), luts).sum()) == sum(len(d.encode()) for d in docs)


def test_prefix_byte_counts_match_decoded_prefixes(sp, luts):
    for doc in demo.make_demo_text(5, seed=7):
        ids = sp.encode(doc)
        cum = np.cumsum(tg.target_byte_counts(np.asarray([BOS] + ids), luts))
        for k in range(1, len(ids) + 1):
            assert cum[k - 1] == len(sp.decode(ids[:k]).encode("utf-8"))


@pytest.mark.parametrize("doc", NON_ASCII_DOCS + ["Ada saw a ☃ and an Ω near the river."])
def test_sum_equals_utf8_length_of_non_ascii_documents(sp, luts, doc):
    ids = [BOS] + sp.encode(doc)
    assert sp.decode(ids[1:]) == doc
    assert int(tg.target_byte_counts(np.asarray(ids), luts).sum()) == len(doc.encode("utf-8"))


# ---------------------------------------------------------------- load_tokenizer


def test_load_tokenizer_ok(small_sp):
    assert tg.load_tokenizer(small_sp, 400).vocab_size() == 400


def test_load_tokenizer_vocab_mismatch(small_sp):
    with pytest.raises(ValueError, match="VOCAB_SIZE=1024"):
        tg.load_tokenizer(small_sp, 1024)


def test_load_tokenizer_missing(tmp_path):
    path = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match=re.escape(path)):
        tg.load_tokenizer(path, 400)


def test_load_tokenizer_not_a_model_file(small_sp, tmp_path):
    other = tmp_path / "tokenizer.vocab"
    shutil.copy(small_sp, other)  # a real SentencePiece model, wrong name
    with pytest.raises(FileNotFoundError, match="TOKENIZER_PATH"):
        tg.load_tokenizer(str(other), 400)
    with pytest.raises(FileNotFoundError):
        tg.load_tokenizer(str(tmp_path), 400)  # a directory
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a SentencePiece model\n" * 10)
    with pytest.raises(ValueError, match=f"TOKENIZER_PATH={garbage} is not a SentencePiece model") as exc:
        tg.load_tokenizer(str(garbage), 400)
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------- evaluate()


@pytest.mark.parametrize("num_targets,seq_len,stride,batch", [(100, 16, 16, 4), (100, 16, 5, 3), (37, 16, 0, 2),
                                                              (10, 16, 4, 8), (64, 16, 16, 64)])
def test_evaluate_scores_every_target_once(num_targets, seq_len, stride, batch):
    """A fake model whose loss at a position is the target's value: over tokens 0..N, the mean loss must be the
    mean of 1..N whatever the windows, and bpb must follow loss/ln2 * tokens/bytes."""
    tokens = torch.arange(num_targets + 1, dtype=torch.int64)
    rng = np.random.default_rng(num_targets)
    target_bytes = torch.from_numpy(rng.integers(0, 5, size=num_targets)).to(torch.int64)
    target_bytes[0] = 3  # nonzero total

    def fake_token_losses(x, y):
        assert x.shape == y.shape
        assert torch.equal(y, x + 1)  # targets are the next tokens of each window
        return y.to(torch.float32)

    val = {"tokens": tokens, "target_bytes": target_bytes}
    loss, bpb, count = tg.evaluate(fake_token_losses, val, seq_len, stride, batch, 0, 1, torch.device("cpu"), False)
    assert count == num_targets
    expected_loss = (num_targets + 1) / 2  # mean of 1..N
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    assert bpb == pytest.approx(expected_loss / math.log(2) * num_targets / int(target_bytes.sum()), rel=1e-12)


def enwiki_val(tmp_path, vocab: int) -> tuple[np.ndarray, Path]:
    """The enwiki validation shard of the shared development data and its official tokenizer (skip if absent)."""
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    shard_xz = shared / f"enwiki2015_sp{vocab}" / "fineweb_val_000000.bin.xz"
    model = shared / "tokenizers" / f"fineweb_{vocab}_bpe.model"
    if not (shard_xz.is_file() and model.is_file()):
        pytest.skip(f"the enwiki sp{vocab} shards and the official tokenizer are not beside this checkout")
    (tmp_path / "fineweb_val_000000.bin").write_bytes(lzma.decompress(shard_xz.read_bytes()))
    return tg.load_validation_tokens(str(tmp_path)), model


def test_official_tokenizer_bytes_of_the_enwiki_val_shard(tmp_path):
    """The official sp1024 tokenizer on the enwiki validation shard: the data's own documentation gives
    3,884,048 tokens and 9,755,837 bytes by the official rule. Our tables must reproduce the byte count."""
    tokens, model = enwiki_val(tmp_path, 1024)
    luts = tg.build_sentencepiece_luts(tg.load_tokenizer(str(model), 1024))
    assert tokens.size == 3_884_048
    assert int(tg.target_byte_counts(tokens, luts).sum()) == 9_755_837


def test_official_sp8192_tokenizer_bytes_of_the_enwiki_val_shard(tmp_path):
    """The same text with the official 8192-piece tokenizer: 2,702,855 tokens and 9,774,711 bytes by the official
    rule. Unlike sp1024 it has 256 byte-fallback pieces (ids 4-259), each one byte; the shards are reproduced by
    decoding and encoding again, which load_evaluation_data checks."""
    tokens, model = enwiki_val(tmp_path, 8192)
    sp = tg.load_tokenizer(str(model), 8192)
    base_bytes, has_space, is_boundary = luts = tg.build_sentencepiece_luts(sp)
    byte_pieces = [i for i in range(8192) if sp.is_byte(i)]
    assert byte_pieces == list(range(4, 260)) and (base_bytes[byte_pieces] == 1).all()
    assert not has_space[byte_pieces].any() and not is_boundary[byte_pieces].any()
    assert tokens.size == 2_702_855
    assert int(tg.target_byte_counts(tokens, luts).sum()) == 9_774_711
    assert tg.check_tokenizer_matches(sp, tokens, str(model)) > 0
    # a character outside the merges: its UTF-8 bytes through byte fallback, one byte per piece
    ids = sp.encode("\u2603")
    assert all(sp.is_byte(i) for i in ids[-3:])
    assert int(tg.target_byte_counts(np.array([1] + ids), luts).sum()) == len("\u2603".encode())
