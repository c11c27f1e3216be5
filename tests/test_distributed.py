"""Several processes (torchrun, gloo on CPU) train the same model as one: same global batch, same loss curve.

Rank r of W takes slice r of each global micro-batch span, and gradient accumulation keeps the global batch
fixed, so 1 and 2 processes average the gradients of the same sequences. The logged train_loss is the global
mean, so the two logs agree line by line; evaluation and calibration all-reduce their sums."""

from __future__ import annotations

import re
import subprocess
import sys

import torch

from conftest import REPO_ROOT
from test_end_to_end import EXACT, RUN_ENV, clean_env, data_env, new_workdir

STEP = re.compile(r"^step:(\d+)/\d+ train_loss:([0-9.]+) ", re.M)
PRE = re.compile(r"^pre_export val_loss:([0-9.]+) ", re.M)


def body(log: str) -> str:
    return log.split("=" * 100, 1)[1]  # drop the archived source at the top


def test_two_processes_follow_the_same_loss_curve_as_one(tmp_path_factory, demo_data_dir):
    env = dict(RUN_ENV, ITERATIONS="8", WARMUP_STEPS="0", TRAIN_BATCH_TOKENS="4096", TRAIN_LOG_EVERY="1",
               **data_env(demo_data_dir))
    logs, workdirs = {}, {}
    for nproc in (1, 2):
        workdir = workdirs[nproc] = new_workdir(tmp_path_factory, f"dist{nproc}")
        cmd = [sys.executable, "train_gpt.py"] if nproc == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_gpt.py"]
        proc = subprocess.run(cmd, cwd=workdir, env=clean_env(**dict(env, RUN_ID=f"n{nproc}", OMP_NUM_THREADS="1")),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[nproc] = body((workdir / "logs" / f"n{nproc}.txt").read_text())
    assert "world_size:2 grad_accum_steps:4" in logs[2] and "world_size:1 grad_accum_steps:8" in logs[1]
    curves = {n: [(int(s), float(v)) for s, v in STEP.findall(log)] for n, log in logs.items()}
    assert [s for s, _ in curves[1]] == list(range(1, 9)) == [s for s, _ in curves[2]]
    for (_, one), (_, two) in zip(curves[1], curves[2]):
        assert abs(one - two) < 2e-3, (curves[1], curves[2])
    assert curves[1][-1][1] < curves[1][0][1] - 1.0  # it learned, so equal curves mean something
    assert abs(float(PRE.search(logs[1]).group(1)) - float(PRE.search(logs[2]).group(1))) < 2e-3
    finals = {n: {tag: float(loss) for tag, loss, _ in EXACT.findall(log)} for n, log in logs.items()}
    assert set(finals[1]) == set(finals[2]) == {"roundtrip", "sliding_window", "doc_isolated", "ttt"}  # as on 1
    for tag in finals[1]:
        assert abs(finals[1][tag] - finals[2][tag]) < 5e-3, (tag, finals)
    # calibration: each rank measures its slice of the same sequences, and the sums over ranks are one process's
    # (up to the float noise by which the two runs' weights differ; a sum of one rank's half would be off by half)
    stats = {n: torch.load(workdirs[n] / "checkpoints" / f"n{n}.pt", weights_only=True)["stats"] for n in (1, 2)}
    assert stats[1]["tokens"] == stats[2]["tokens"] > 0
    for table in ("hessians", "grad_energy", "counts"):
        assert set(stats[1][table]) == set(stats[2][table])
        for key, one in stats[1][table].items():
            two = stats[2][table][key]
            assert float((two - one).norm()) < 0.2 * float(one.norm()), (table, key)


def test_wall_clock_schedule_keeps_replicas_identical(tmp_path_factory, demo_data_dir):
    """With a wall-clock budget the LR, momentum and EMA follow elapsed time. Ranks share one clock (the slowest
    rank's), so their weights stay identical; the script checks this and logs it."""
    env = dict(RUN_ENV, ITERATIONS="10000", MAX_WALLCLOCK_SECONDS="10", WARMUP_STEPS="0",
               TRAIN_BATCH_TOKENS="4096", RUN_ID="clock", OMP_NUM_THREADS="1", **data_env(demo_data_dir))
    workdir = new_workdir(tmp_path_factory, "clock")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_gpt.py"], cwd=workdir, env=clean_env(**env), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = body((workdir / "logs" / "clock.txt").read_text())
    assert "stopping_early: wallclock_cap" in log
    assert "replicas_in_sync:True" in log


def test_an_export_failure_on_rank_0_stops_every_rank(tmp_path_factory, demo_data_dir):
    env = dict(RUN_ENV, ITERATIONS="2", WARMUP_STEPS="0", TRAIN_BATCH_TOKENS="4096", RUN_ID="fail",
               OMP_NUM_THREADS="1", ARTIFACT_PATH="/nonexistent_dir/model.ptz", **data_env(demo_data_dir))
    workdir = new_workdir(tmp_path_factory, "fail")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_gpt.py"], cwd=workdir, env=clean_env(**env), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    log = body((workdir / "logs" / "fail.txt").read_text())
    assert "ERROR: RuntimeError: export failed" in log and "nonexistent_dir" in log
    facts = (workdir / "logs" / "fail.json")
    assert not facts.exists() or '"status": "exported"' not in facts.read_text()


SHARDED_MUON = r'''
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
import train_gpt as tg
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
shapes = [(8, 4)] * 5 + [(4, 8)] * 2 + [(6, 6)]  # 5 matrices: shares of 3 and 2 (one zero pad); 1 matrix: one pad


def run(rank, world):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    seen = []

    def orthogonalize(g, steps):
        seen.append(g.size(0))
        return tg.zeropower_via_newtonschulz5(g, steps)

    muon = tg.Muon(params, lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.01, orthogonalize=orthogonalize,
                   rank=rank, world_size=world)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)  # the same (all-reduced) gradient on every rank
        muon.step()
    return params, seen


sharded, seen = run(rank, world)
reference, seen_alone = run(0, 1)
assert seen == [3, 1, 1] * 3, seen  # this rank's share of each group, not the whole group
assert seen_alone == [5, 2, 1] * 3, seen_alone
for a, b in zip(sharded, reference):
    assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
flat = torch.cat([p.detach().flatten() for p in sharded])
gathered = [torch.empty_like(flat) for _ in range(world)]
dist.all_gather(gathered, flat)
assert all(torch.equal(gathered[0], g) for g in gathered)  # every rank holds the same bytes
print(f"rank {rank}: sharded update matches the single-process update", flush=True)
tg.leave_process_group()
os._exit(0)  # as train_gpt.py does: no interpreter shutdown while gloo's threads may still hold tensors
'''


def run_on_two_ranks(tmp_path, source: str, success: str, timeout: float = 600) -> None:
    """Run a helper script under torchrun with two gloo ranks; both must exit cleanly and print `success`."""
    script = tmp_path / "two_ranks.py"
    script.write_text(source)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(REPO_ROOT)], env=clean_env(OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count(success) == 2


def test_muon_orthogonalises_each_rank_share_and_matches_one_process(tmp_path):
    """Each rank runs Newton-Schulz on its share of every shape group only, and the all-gathered update equals
    the one a single process computes for the whole group."""
    run_on_two_ranks(tmp_path, SHARDED_MUON, "sharded update matches")
