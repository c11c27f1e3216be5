"""Score-first test-time training: no loss counted for a target can depend on a later token, across chunk
boundaries and ranks; every target is scored once; with no learning rate it is the sliding evaluation; it adapts."""

from __future__ import annotations

import pytest
import torch

import train_gpt as tg
from conftest import markov_batches, randomize_, tiny_args, train_tiny
from test_distributed import run_on_two_ranks

TTT_ENV = dict(EVAL_SEQ_LEN="32", EVAL_STRIDE="8", EVAL_BATCH_SEQS="4", TTT_CHUNK_TOKENS="64", TTT_EPOCHS="2")


def stream(n: int = 500, seed: int = 3) -> torch.Tensor:
    (x, y), = markov_batches(128, 1, 1, n - 1, seed=seed)
    return torch.cat((x[0, :1], y[0]))


def val_of(tokens: torch.Tensor) -> dict:
    return {"tokens": tokens, "target_bytes": torch.ones(tokens.numel() - 1, dtype=torch.int64) * 2}


def ttt_per_target(tokens: torch.Tensor, lr: float = 0.5, seed: int = 0, **env) -> tuple[torch.Tensor, tuple]:
    torch.manual_seed(seed)
    args = tiny_args(**dict(TTT_ENV, TTT_LR=str(lr), **env))
    model = randomize_(tg.GPT(args), std=0.05, seed=seed)
    per_target = torch.zeros(tokens.numel() - 1, dtype=torch.float64)
    out = tg.evaluate_ttt(model, model.token_losses, val_of(tokens), args, 0, 1, torch.device("cpu"), False,
                          per_target)
    return per_target, out


def test_no_loss_depends_on_a_later_token_across_chunk_boundaries():
    tokens = stream()
    base, (loss, bpb, count, facts) = ttt_per_target(tokens)
    assert count == tokens.numel() - 1 and facts["chunks"] >= 6 and facts["updates"] == 2 * (facts["chunks"] - 1)
    assert facts["score_first"] is True and facts["updates_on_unscored_targets"] == 0
    assert (base > 0).all()  # every target scored (and once: evaluate_ttt checks the count)
    for t in (40, 63, 64, 65, 128, 129, 200, 321, 450):  # chunk boundaries fall at multiples of 64 targets
        changed = tokens.clone()
        changed[t] = (changed[t] + 17) % 128
        after, _ = ttt_per_target(changed)
        # target j predicts token j + 1: targets before t - 1 never saw token t, directly or through an update
        assert torch.equal(after[:t - 1], base[:t - 1]), t
        assert not torch.equal(after[t - 1:], base[t - 1:])  # the change itself is seen from there on


def test_the_score_first_flag_is_measured(monkeypatch):
    """The flag comes from counting what the ranks have scored before each update: hold the scoring of every chunk
    back until the stream's last window (every target is still scored once), and each update is caught."""
    real, held = tg.score_windows, []

    def scored_too_late(token_losses, val, starts, firsts, seq_len, *rest):
        held.append((starts, firsts))
        if len(starts) and starts[-1] + seq_len == val["tokens"].numel() - 1:  # the stream's last window
            for s, f in held:
                real(token_losses, val, s, f, seq_len, *rest)

    monkeypatch.setattr(tg, "score_windows", scored_too_late)
    _, (_, _, count, facts) = ttt_per_target(stream())
    assert count == 499 and facts["score_first"] is False
    assert facts["updates_on_unscored_targets"] == facts["chunks"] - 1


def chunk_snapshots(tokens: torch.Tensor, monkeypatch) -> tuple[list[list[torch.Tensor]], list[int]]:
    """The weights each chunk is scored with (score_windows runs once a chunk, before its update), and each chunk's
    first scored target."""
    torch.manual_seed(0)
    args = tiny_args(**dict(TTT_ENV, TTT_LR="0.5"))
    model = randomize_(tg.GPT(args), std=0.05, seed=0)
    shots: list[list[torch.Tensor]] = []
    real = tg.score_windows

    def snapshot_then_score(*a, **k) -> None:
        shots.append([p.detach().clone() for p in model.parameters()])
        real(*a, **k)

    monkeypatch.setattr(tg, "score_windows", snapshot_then_score)
    tg.evaluate_ttt(model, model.token_losses, val_of(tokens), args, 0, 1, torch.device("cpu"), False)
    monkeypatch.undo()
    seq_len, starts, firsts = tg.stream_windows(tokens.numel() - 1, args.eval_seq_len, args.eval_stride)
    first_target = starts + firsts
    chunk_of = first_target // args.ttt_chunk_tokens
    return shots, [int(first_target[chunk_of == c].min()) for c in sorted(set(chunk_of.tolist()))]


def test_the_weights_that_score_a_chunk_never_read_its_targets(monkeypatch):
    """Whatever the code plans, what counts is what the updates read: the weights that score chunk c must not change
    when any target at or after chunk c's first one changes (target j is the token at j + 1). An update that reads
    one position too far (the label of the next chunk's first target) fails here, though every loss before the
    changed token stays the same."""
    tokens = stream()
    base, firsts = chunk_snapshots(tokens, monkeypatch)
    assert len(base) == len(firsts) >= 6
    for c, target in ((1, firsts[1]), (1, firsts[1] + 3), (3, firsts[3]), (len(firsts) - 1, firsts[-1])):
        changed = tokens.clone()
        changed[target + 1] = (changed[target + 1] + 17) % 128
        shots, _ = chunk_snapshots(changed, monkeypatch)
        for k in range(c + 1):  # this chunk's weights and every earlier chunk's
            assert all(torch.equal(a, b) for a, b in zip(shots[k], base[k])), (c, target, k)
    # ... and the snapshots can see a change: the last target of chunk 1 does move the weights that score chunk 2
    changed = tokens.clone()
    changed[firsts[2]] = (changed[firsts[2]] + 17) % 128
    assert any(not torch.equal(a, b) for a, b in zip(chunk_snapshots(changed, monkeypatch)[0][2], base[2]))


def test_an_update_reading_the_first_unscored_target_is_caught(monkeypatch):
    """The edge of the rule: hold back the score of exactly one target, the chunk's last, until the end (every target
    is still scored once). Each update then reads one target that is not yet scored, and each is counted."""
    real = tg.score_windows

    def one_short(token_losses, val, starts, firsts, seq_len, batch_seqs, device, use_autocast, sums, *rest):
        real(token_losses, val, starts, firsts, seq_len, batch_seqs, device, use_autocast, sums, *rest)
        last = len(starts) and starts[-1] + seq_len == val["tokens"].numel() - 1
        sums[1] += one_short.held if last else -1  # the stream's last window gives back what was held
        one_short.held = 0 if last else one_short.held + 1

    one_short.held = 0
    monkeypatch.setattr(tg, "score_windows", one_short)
    _, (_, _, count, facts) = ttt_per_target(stream())
    assert count == 499 and facts["updates_on_unscored_targets"] == facts["chunks"] - 1 > 0
    assert facts["score_first"] is False


def test_adaptation_reaches_later_chunks_only():
    """The test above would pass for a model that never adapts: check that updates did change later scores."""
    tokens = stream()
    adapted, _ = ttt_per_target(tokens, lr=0.5)
    frozen, _ = ttt_per_target(tokens, lr=0.0)
    first_chunk = 64 + 8  # the first chunk's targets are scored before any update
    assert torch.equal(adapted[:first_chunk - 8], frozen[:first_chunk - 8])
    assert (adapted[first_chunk:] - frozen[first_chunk:]).abs().max() > 1e-3


def test_without_learning_rate_it_is_the_sliding_evaluation():
    tokens = stream()
    frozen, (loss, bpb, count, _) = ttt_per_target(tokens, lr=0.0)
    torch.manual_seed(0)
    args = tiny_args(**TTT_ENV)
    model = randomize_(tg.GPT(args), std=0.05, seed=0)
    sliding = torch.zeros_like(frozen)
    ref = tg.evaluate(model.token_losses, val_of(tokens), 32, 8, 4, 0, 1, torch.device("cpu"), False, sliding)
    torch.testing.assert_close(frozen, sliding, rtol=0, atol=1e-12)
    assert (loss, bpb, count) == pytest.approx(ref, abs=1e-12)


def test_it_adapts_to_the_stream():
    """A model trained on one Markov chain, evaluated on the same chain with its tokens renamed: TTT learns the
    new chain as it goes."""
    args = tiny_args(**TTT_ENV, TTT_LR="0.05")
    model, _ = train_tiny(args, steps=20)
    tokens = torch.randperm(128, generator=torch.Generator().manual_seed(9))[stream(2000, seed=9)]  # another chain
    sliding = tg.evaluate(model.token_losses, val_of(tokens), 32, 8, 4, 0, 1, torch.device("cpu"), False)
    ttt = tg.evaluate_ttt(model, model.token_losses, val_of(tokens), args, 0, 1, torch.device("cpu"), False)
    assert ttt[0] < sliding[0] - 0.05, (ttt[0], sliding[0])


TWO_RANKS = r'''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
import train_gpt as tg
from test_ttt import stream, val_of, TTT_ENV
from conftest import randomize_, tiny_args
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


def per_target(tokens, rank, world):
    torch.manual_seed(0)
    args = tiny_args(**dict(TTT_ENV, TTT_LR="0.5"))
    model = randomize_(tg.GPT(args), std=0.05, seed=0)
    out = torch.zeros(tokens.numel() - 1, dtype=torch.float64)
    tg.evaluate_ttt(model, model.token_losses, val_of(tokens), args, rank, world, torch.device("cpu"), False, out)
    return out


tokens = stream()
two = per_target(tokens, rank, world)
one = per_target(tokens, 0, 1)
assert (two - one).abs().max() < 1e-5, (two - one).abs().max()  # the same as one process, up to float noise
for t in (64, 129, 321):
    changed = tokens.clone()
    changed[t] = (changed[t] + 17) % 128
    after = per_target(changed, rank, world)
    assert torch.equal(after[:t - 1], two[:t - 1]), t
print(f"rank {rank}: two ranks score as one, and score first", flush=True)
tg.leave_process_group()
os._exit(0)
'''


def test_two_ranks_score_as_one_and_score_first(tmp_path):
    run_on_two_ranks(tmp_path, TWO_RANKS, "two ranks score as one")
