"""TRAINING, EXPORT AND ROUND-TRIP EVALUATION: `python3 train_gpt.py` as a subprocess on the demo data (CPU)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import train_gpt as tg
from scripts import demo, pack
from conftest import REPO_ROOT, SCRIPT_PATH

RUN_ENV = {
    "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "VOCAB_SIZE": "512",
    "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "32", "TRAIN_BATCH_TOKENS": "2048",
    "ITERATIONS": "20", "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "2", "SSM_LAYERS": "0",
    "SSM_KERNEL_SIZE": "16", "VAL_MAX_TOKENS": "20000", "TTT_CHUNK_TOKENS": "8192",
    "RUN_ID": "e2e",
}
# data and evaluation only: scripts/evaluate.py takes the model's shape from the artifact or checkpoint
EVAL_ENV = {k: RUN_ENV[k] for k in ("VOCAB_SIZE", "EVAL_SEQ_LEN", "EVAL_STRIDE", "VAL_MAX_TOKENS", "TTT_CHUNK_TOKENS")}
EXACT = re.compile(r"^final_\w+?_(roundtrip|sliding_window|doc_isolated|ttt)_exact val_loss:([0-9.]+) val_bpb:([0-9.]+)$", re.M)


def clean_env(**extra: str) -> dict[str, str]:
    """The parent environment without any of the script's knobs or torchrun variables, then `extra`."""
    knobs = set(tg.Hyperparameters(env={}).values)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(tg.OWNED_PREFIXES) and k not in knobs
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


# Only a guard against a hung run: on a loaded 2-core machine a run here takes several times its unloaded time.
HANG_TIMEOUT = 900


def run_script(workdir: Path, env: dict[str, str], timeout: float = HANG_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_gpt.py"], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_evaluate(workdir: Path, env: dict[str, str], *arguments: str) -> subprocess.CompletedProcess:
    """scripts/evaluate.py with the workdir's train_gpt.py (the one whose bytes count)."""
    command = [sys.executable, str(REPO_ROOT / "scripts" / "evaluate.py"), *arguments,
               "--script", str(workdir / "train_gpt.py")]
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)


def new_workdir(tmp_path_factory, name: str) -> Path:
    d = tmp_path_factory.mktemp(name)
    shutil.copy(SCRIPT_PATH, d / "train_gpt.py")
    return d


def data_env(demo: Path) -> dict[str, str]:
    return {"DATA_PATH": str(demo), "TOKENIZER_PATH": str(demo / "demo_512_bpe.model")}


@pytest.fixture(scope="module")
def run(demo_data_dir, tmp_path_factory):
    workdir = new_workdir(tmp_path_factory, "e2e_train")
    (workdir / "final_model.ptz").write_bytes(b"an earlier artifact")  # a new run must not overwrite it
    proc = run_script(workdir, clean_env(**data_env(demo_data_dir), **RUN_ENV))
    assert proc.returncode == 0, f"training run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    log = (workdir / "logs" / "e2e.txt").read_text(encoding="utf-8")
    facts = json.loads((workdir / "logs" / "e2e.json").read_text(encoding="utf-8"))
    code = (workdir / "train_gpt.py").read_bytes()
    source = code.decode("utf-8")
    assert source in log  # the exact source is archived with the run
    body = log.replace(source, "", 1)  # what the run itself logged
    return SimpleNamespace(workdir=workdir, proc=proc, log=log, body=body, facts=facts, code=code,
                           artifact=workdir / "final_model.ptz", checkpoint=workdir / "checkpoints" / "e2e.pt")


def exact_lines(log: str) -> dict[str, tuple[str, float, float]]:
    """{"roundtrip" | "sliding_window" | "doc_isolated" | "ttt": (the whole line, val_loss, val_bpb)}"""
    return {m.group(1): (m.group(0), float(m.group(2)), float(m.group(3))) for m in EXACT.finditer(log)}


def test_training_run_log(run):
    log = run.body
    assert log.startswith("\n" + "=" * 100)  # the source comes first, then the separator
    for needle in ("step:1/20 train_loss:", "step:10/20 train_loss:", "train_summary steps:20",
                   "_roundtrip_exact val_loss:", "_sliding_window_exact val_loss:", "Total submission size ",
                   "warmup_step:2/2", "quant_summary alloc:1",
                   "quant_tensor blocks.0.ssm.in_proj.weight bits:", "checkpoint:checkpoints/e2e.pt"):
        assert needle in log, needle
    assert "Traceback" not in run.proc.stderr
    # console output is the log minus the archived source
    assert "_sliding_window_exact val_loss:" in run.proc.stdout and "quant_tensor" not in run.proc.stdout


def test_final_training_step_is_logged(run):
    assert "step:20/20 train_loss:" in run.body


def test_artifact_and_sizes(run):
    assert run.artifact.is_file()
    size = run.artifact.stat().st_size
    total = size + len(run.code)
    logged = re.search(r"Total submission size \w+\+lzma: (\d+) bytes", run.body)
    assert logged and int(logged.group(1)) == total
    assert re.search(rf"Serialized model \w+\+lzma: {size} bytes", run.body)
    assert re.search(rf"Code size: {len(run.code)} bytes", run.body)
    f = run.facts
    assert f["bytes_total"] == total and f["bytes_model"] == size and f["bytes_code"] == len(run.code)
    assert f["under_limit"] is (total <= 16_000_000) is True
    # the artifact on disk is a loadable artifact with the run's shape
    artifact = tg.deserialize_artifact(run.artifact.read_bytes())
    assert artifact["config"]["NUM_LAYERS"] == "2" and artifact["config"]["SSM_LAYERS"] == "0"


def test_facts_json(run):
    f, lines = run.facts, exact_lines(run.log)
    _, sw_loss, sw_bpb = lines["sliding_window"]
    _, rt_loss, rt_bpb = lines["roundtrip"]
    _, ttt_loss, ttt_bpb = lines["ttt"]
    assert f["status"] == "evaluated" and f["steps"] == 20 and f["run_id"] == "e2e"
    assert f["val_bpb"] == pytest.approx(ttt_bpb, abs=1e-8) and f["val_loss"] == pytest.approx(ttt_loss, abs=1e-8)
    assert f["results"]["ttt"]["val_bpb"] == pytest.approx(ttt_bpb, abs=1e-8)  # the last pass is the headline
    ttt = f["results"]["ttt"]
    assert ttt["score_first"] is True and ttt["updates_on_unscored_targets"] == 0 and ttt["updates"] > 0
    assert ttt["on"] == "dequantized artifact" and ttt["method"] == "score-first per-document LoRA"
    assert ttt["documents"] > 100 and 0 < ttt["phase"]["targets"] < f["val_tokens"]
    assert f["compliance"]["test_time_adaptation"].startswith("score-first")
    assert 0 < f["results"]["doc_isolated"]["val_bpb"] != ttt["val_bpb"]
    # every pass's seconds count, TTT's included
    assert f["eval_time_seconds"] == pytest.approx(f["pre_quant_eval_seconds"] + sum(r["eval_seconds"] for r in
                                                                                   f["results"].values()), abs=1e-9)
    assert f["pre_quant_eval_seconds"] > 0  # the pre-export pass compiles what the artifact's passes run: it counts
    assert f["eval_time_seconds"] > f["results"]["ttt"]["eval_seconds"] > 0
    assert re.search(r"^ttt: rank-80 adapters on head,attn,ssm,mlp, .* over the frozen dequantized artifact: \d+ "
                     r"documents, documents longest first, 64 a batch; .* then every weight on the first \d+ "
                     r"documents.* updates reading targets not yet scored: 0 score_first:True$", run.body, re.M)
    assert f["results"]["roundtrip"]["val_bpb"] == pytest.approx(rt_bpb, abs=1e-8)
    assert f["results"]["sliding_window"]["val_bpb"] == pytest.approx(sw_bpb, abs=1e-8)
    assert f["val_tokens"] == 20000 - 1 and f["val_documents"] > 10
    # validity is what this run measured: no wall-clock cap, a prefix of the validation split and a CPU break rules
    c = f["compliance"]
    assert c["artifact_under_16mb"] is f["under_limit"] is True
    assert c["eval_under_600s"] is None  # a prefix was scored: the time of the whole split is not known
    assert c["train_under_600s"] is (f["train_plus_calibration_s"] <= 600) is True
    assert c["no_val_data_in_training"] is True and f["train_documents_in_val"] == 0
    assert f["train_documents_checked"] > 1000
    assert re.search(r"^train_val_overlap: 0 of \d+ training documents sampled", run.body, re.M)
    assert c["score_first"] is True and c["finite_score"] is True
    assert c["wallclock_cap_set"] is False and c["official_validation_split"] is False and c["eight_h100"] is False
    assert c["calibration_within_wallclock"] is f["calibration_within_wallclock"] is False
    assert "outside the training wall clock" in c["calibration"]
    assert f["valid"] is False and len(f["broken_rules"]) == 4 and f["not_assessed"] == ["eval_under_600s"]
    assert any("VAL_MAX_TOKENS=20000" in why for why in f["broken_rules"])
    assert any("MAX_WALLCLOCK_SECONDS=0" in why for why in f["broken_rules"])
    assert any("ran on 1x CPU, not 8x NVIDIA H100 80GB HBM3" in why for why in f["broken_rules"])
    assert f["hardware"] == f["train_hardware"] == "1x CPU" and f["train_val_runs"] == 0
    line = re.search(r"^submission_facts:\S+ valid:(\w+)(.*)$", run.body, re.M)
    assert line.group(1) == "False" and "broke: " in line.group(2) and "VAL_MAX_TOKENS=20000" in line.group(2)
    assert run.body.rstrip("\n").rsplit("\n", 1)[-1] == line.group(0)  # the verdict is the log's last line
    # the rules that hold on any hardware and data are told apart: here two of them are broken
    assert f["valid_except_hardware_and_data"] is False
    assert "valid_except_hardware_and_data:False" in run.body
    assert f["config"]["ITERATIONS"] == "20" and f["config"]["SSM_LAYERS"] == "0"
    # bpb = loss / ln 2 * tokens / bytes, with the logged token and byte counts
    assert sw_bpb == pytest.approx(sw_loss / math.log(2) * f["val_tokens"] / f["val_bytes"], rel=1e-6)


def test_model_learned_and_round_trip_is_close(run):
    f = run.facts
    pre = re.search(r"pre_export val_loss:([0-9.]+) val_bpb:([0-9.]+)", run.body)
    assert pre and float(pre.group(2)) == pytest.approx(f["pre_quant_val_bpb"], abs=1e-4)
    assert f["pre_quant_val_loss"] < math.log(512) - 1.0  # well below a uniform guess over 512 tokens
    assert abs(f["results"]["roundtrip"]["val_bpb"] - f["pre_quant_val_bpb"]) < 0.05


def test_an_existing_artifact_is_kept_and_announced(run):
    kept = run.workdir / "final_model.1.ptz"
    assert kept.read_bytes() == b"an earlier artifact"
    assert f"note: final_model.ptz existed: the earlier artifact is kept as {kept.name}" in run.body


def test_eval_only_reproduces_round_trip(run, demo_data_dir, tmp_path_factory):
    workdir = new_workdir(tmp_path_factory, "e2e_eval")
    env = clean_env(**data_env(demo_data_dir), **EVAL_ENV, RUN_ID="e2e_eval", NUM_LAYERS="7", SEED="5")
    proc = run_evaluate(workdir, env, "--artifact", str(run.artifact))
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = (workdir / "logs" / "e2e_eval.txt").read_text(encoding="utf-8")
    before, after = exact_lines(run.log), exact_lines(log)
    assert set(after) == {"roundtrip", "sliding_window", "doc_isolated", "ttt"}
    for key in after:
        assert after[key][0] == before[key][0]
    console = proc.stdout  # the log without the archived source code
    assert "_roundtrip_exact" in console and "NUM_LAYERS=2 (not 7)" in console  # the artifact fixes the shape,
    assert "SEED=1337 (not 5)" in console  # and the seed the TTT adapters start from and the facts report
    assert "train_loss" not in console and "Serialized model" not in console  # nothing trained or exported
    assert not (workdir / "final_model.ptz").exists()
    facts = json.loads((workdir / "logs" / "e2e_eval.json").read_text(encoding="utf-8"))
    assert facts["status"] == "evaluated" and facts["bytes_total"] == run.facts["bytes_total"]
    assert facts["seed"] == run.facts["seed"] == 1337
    assert facts["results"]["roundtrip"]["val_bpb"] == run.facts["results"]["roundtrip"]["val_bpb"]
    assert facts["valid"] is False and "train_under_600s" in facts["not_assessed"]
    assert not any("train" in why for why in facts["broken_rules"])  # not assessed is not broken
    assert facts["compliance"]["train_under_600s"] is None and facts["compliance"]["artifact_under_16mb"] is True


def test_eval_only_without_ttt_ends_at_the_sliding_pass(run, demo_data_dir, tmp_path_factory):
    """TTT_MODE=off on the same artifact: the same round-trip and sliding lines, no other pass, and the sliding
    score is the headline."""
    workdir = new_workdir(tmp_path_factory, "e2e_off")
    env = clean_env(**data_env(demo_data_dir), **EVAL_ENV, RUN_ID="off", TTT_MODE="off")
    proc = run_evaluate(workdir, env, "--artifact", str(run.artifact))
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = (workdir / "logs" / "off.txt").read_text(encoding="utf-8").split("=" * 100, 1)[1]
    passes = re.findall(r"^final_\w+?_(\w+)_exact val_loss:[0-9.]+ val_bpb:[0-9.]+$", log, re.M)
    assert passes == ["roundtrip", "sliding_window"]
    before, after = exact_lines(run.log), exact_lines(log)
    assert after["roundtrip"][0] == before["roundtrip"][0] and after["sliding_window"][0] == before["sliding_window"][0]
    facts = json.loads((workdir / "logs" / "off.json").read_text(encoding="utf-8"))
    assert facts["val_bpb"] == facts["results"]["sliding_window"]["val_bpb"] and "ttt" not in facts["results"]
    assert facts["compliance"]["test_time_adaptation"] == "none"


def test_eval_timing_times_every_pass_and_profiles_the_lora_pass(run, demo_data_dir, tmp_path_factory):
    """scripts/eval_timing.py on the run's artifact: each pass timed on re-cut documents, the LoRA pass's plan, and
    with --profile an operator table, in a log that holds both scripts' source."""
    workdir = new_workdir(tmp_path_factory, "e2e_timing")
    env = clean_env(**data_env(demo_data_dir), EVAL_SEQ_LEN="64", EVAL_STRIDE="32", RUN_ID="timing")
    command = [sys.executable, str(REPO_ROOT / "scripts" / "eval_timing.py"), "--artifact", str(run.artifact),
               "--script", str(workdir / "train_gpt.py"), "--targets", "3000", "--mean", "100", "--profile"]
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-5000:]
    head, log = (workdir / "logs" / "timing.txt").read_text(encoding="utf-8").split("=" * 100 + "\n", 1)
    assert "def cut_documents" in head and "def final_evaluation" in log.split("=" * 100)[0]
    for label in ("compile_and_roundtrip", "roundtrip", "sliding_window", "doc_isolated", "ttt_lora (profiled)"):
        share = "the busiest of 8 GPUs on" if label.startswith("ttt_lora") else "1/8 of"  # by the plan, or by targets
        assert re.search(rf"^eval_timing {re.escape(label)}: 3000 targets in [0-9.]+s \(\d+ targets/s; .*-> \d+s for "
                         rf"{share} the official split$", log, re.M), label
    cost = re.search(r"^eval_timing ttt_lora cost: (\S+) here, (\S+) on the busiest of 8 GPUs on an official-size "
                     r"split cut the same way \(x([0-9.]+); by targets: x[0-9.]+\)$", log, re.M)
    # the official split's plan, priced here as the script should price it: 8 GPUs, the artifact's model, mean 100
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import eval_timing
    config = tg.deserialize_artifact(run.artifact.read_bytes())["config"]
    args = tg.Hyperparameters(env={**env, **config})
    there = eval_timing.lora_cost(tg, eval_timing.split_documents(tg.OFFICIAL_VAL_TARGETS[8192], 100.0, 1.0,
                                                                  args.seed), args, 8)
    here, logged, factor = float(cost[1]), float(cost[2]), float(cost[3])
    assert math.isclose(logged, there, rel_tol=1e-3) and math.isclose(factor, there / here, rel_tol=0.01)
    timed = re.search(r"^eval_timing ttt_lora \(profiled\): 3000 targets in ([0-9.]+)s .*-> (\d+)s for", log, re.M)
    seconds = float(timed[1])  # printed to 0.1 s, the factor to 0.01
    assert abs(float(timed[2]) - factor * seconds) <= 0.5 + factor * 0.05 + 0.01 * factor * seconds
    assert re.search(r"^eval_timing: 3000 targets re-cut into \d+ documents \(log-normal, mean 100,", log, re.M)
    assert re.search(r"^eval_timing ttt_lora plan: \d+ updates, \d+ positions forward", log, re.M)
    assert "Self CPU" in log and "aten::" in log  # the profile's table


def test_export_only_reproduces_the_artifact_bit_for_bit(run, demo_data_dir, tmp_path_factory):
    """The checkpoint holds the exported weights and the calibration statistics: exporting it again with the same
    settings gives the same bytes and scores, and other settings change the export alone."""
    workdir = new_workdir(tmp_path_factory, "e2e_export")
    env = clean_env(**data_env(demo_data_dir), **EVAL_ENV, RUN_ID="again")
    proc = run_evaluate(workdir, env, "--checkpoint", str(run.checkpoint))
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (workdir / "final_model.ptz").read_bytes() == run.artifact.read_bytes()
    log = (workdir / "logs" / "again.txt").read_text(encoding="utf-8").split("=" * 100, 1)[1]
    assert "train_loss" not in log and "export_only: checkpoint" in log and "steps:20" in log
    before, after = exact_lines(run.log), exact_lines(log)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    facts = json.loads((workdir / "logs" / "again.json").read_text(encoding="utf-8"))
    for key in ("steps", "train_time_ms", "train_plus_calibration_s", "calibration_within_wallclock", "bytes_total",
                "pre_quant_val_loss"):
        assert facts[key] == run.facts[key], key
    assert facts["eval_time_seconds"] == pytest.approx(facts["pre_quant_eval_seconds"] + sum(
        r["eval_seconds"] for r in facts["results"].values()), abs=1e-9)  # its pre-export pass counts too
    env.update(RUN_ID="uniform", QUANT_UNIFORM_BITS="5", ARTIFACT_PATH="uniform.ptz")
    proc = run_evaluate(workdir, env, "--checkpoint", str(run.checkpoint))
    assert proc.returncode == 0, proc.stderr[-5000:]
    other = json.loads((workdir / "logs" / "uniform.json").read_text(encoding="utf-8"))
    assert other["pre_quant_val_loss"] == run.facts["pre_quant_val_loss"]  # the same weights
    assert other["bytes_model"] < run.facts["bytes_model"]  # int5 matrices: a smaller artifact


def test_the_packed_script_runs_counts_its_own_bytes_and_holds_the_source_without_prose(run, demo_data_dir,
                                                                                          tmp_path_factory):
    """scripts/pack.py: the packed script exports the same checkpoint to the same model bytes and scores, counts
    its own (smaller) size as the code, archives itself in the log, and unpacks to the source without its comments
    and docstrings."""
    workdir = tmp_path_factory.mktemp("e2e_packed")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "pack.py"), str(SCRIPT_PATH),
                           str(workdir / "train_gpt.py")], capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    packed = (workdir / "train_gpt.py").read_bytes()
    assert len(packed) < 0.45 * len(run.code) and packed.count(b"\n") == 1
    unpacked = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "pack.py"), "--unpack",
                               str(workdir / "train_gpt.py")], capture_output=True, timeout=HANG_TIMEOUT)
    assert unpacked.returncode == 0 and unpacked.stdout == pack.strip_prose(run.code.decode()).encode()
    again = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "pack.py"), str(SCRIPT_PATH),
                            str(workdir / "train_gpt.py")], capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert again.returncode != 0 and "exists" in again.stderr and (workdir / "train_gpt.py").read_bytes() == packed
    env = clean_env(**data_env(demo_data_dir), **EVAL_ENV, RUN_ID="packed")
    proc = run_evaluate(workdir, env, "--checkpoint", str(run.checkpoint))
    assert proc.returncode == 0, proc.stderr[-5000:]
    facts = json.loads((workdir / "logs" / "packed.json").read_text(encoding="utf-8"))
    assert facts["bytes_code"] == len(packed) and facts["bytes_model"] == run.facts["bytes_model"]
    log = (workdir / "logs" / "packed.txt").read_text(encoding="utf-8")
    assert packed.decode() in log
    assert {k: v[0] for k, v in exact_lines(log).items()} == {k: v[0] for k, v in exact_lines(run.log).items()}


def failed_run(tmp_path_factory, name: str, env: dict, timeout: float = HANG_TIMEOUT) -> tuple[subprocess.CompletedProcess, str]:
    """Run the script expecting a failure; return the process and the last line of its log."""
    workdir = new_workdir(tmp_path_factory, name)
    start = time.perf_counter()
    proc = run_script(workdir, clean_env(**env), timeout=timeout)
    assert proc.returncode != 0 and time.perf_counter() - start < 60
    assert "Traceback" in proc.stderr
    log = (workdir / "logs" / f"{env['RUN_ID']}.txt").read_text(encoding="utf-8")
    assert not (workdir / "final_model.ptz").exists()
    last = log.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith("ERROR: ") and last in proc.stdout
    facts = json.loads((workdir / "logs" / f"{env['RUN_ID']}.json").read_text(encoding="utf-8"))
    assert facts["status"] == "failed" and facts["error"] in last
    return proc, last


def test_sigterm_ends_the_log_and_keeps_what_the_run_wrote(demo_data_dir, tmp_path_factory):
    """A run stopped by SIGTERM in the middle of training ends its log with the reason and its facts say failed."""
    workdir = new_workdir(tmp_path_factory, "sigterm")
    log_path = workdir / "logs" / "sigterm.txt"
    env = clean_env(**data_env(demo_data_dir), **dict(RUN_ENV, RUN_ID="sigterm", ITERATIONS="100000",
                                                      TRAIN_LOG_EVERY="1"))
    proc = subprocess.Popen([sys.executable, "train_gpt.py"], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (log_path.exists() and re.search(r"^step:3/", log_path.read_text(encoding="utf-8"), re.M)):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.2)
        proc.terminate()
        out, err = proc.communicate(timeout=HANG_TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 128 + 15  # the exit status of a process the signal ended
    log = log_path.read_text(encoding="utf-8")
    last = log.rstrip("\n").rsplit("\n", 1)[-1]
    assert last == "ERROR: interrupted (stopped by SIGTERM)" and last in out
    assert re.search(r"^step:3/100000 train_loss:", log, re.M)  # what it logged before the signal stays
    facts = json.loads((workdir / "logs" / "sigterm.json").read_text(encoding="utf-8"))
    assert facts["status"] == "failed" and facts["error"] == "interrupted (stopped by SIGTERM)"
    assert not (workdir / "final_model.ptz").exists()


def test_bad_knob_ends_the_log(demo_data_dir, tmp_path_factory):
    _, last = failed_run(tmp_path_factory, "badenv", dict(**data_env(demo_data_dir), **RUN_ENV, SSM_MODE="bogus"))
    assert "SSM_MODE" in last and "bogus" in last
    _, last = failed_run(tmp_path_factory, "typo", dict(**data_env(demo_data_dir), **RUN_ENV, ITERATONS="5"))
    assert "ITERATONS" in last and "did you mean ITERATIONS" in last


def test_corrupt_validation_shard_is_named(demo_data_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("corrupt_data")
    for name in ("demo_512_bpe.model", "fineweb_train_000000.bin"):
        (data / name).symlink_to(demo_data_dir / name)
    bad = data / "fineweb_val_000000.bin"
    raw = bytearray((demo_data_dir / "fineweb_val_000000.bin").read_bytes())
    raw[:4] = np.array([12345], dtype="<i4").tobytes()
    bad.write_bytes(bytes(raw))
    proc, last = failed_run(tmp_path_factory, "corrupt", dict(**data_env(data), **dict(RUN_ENV, RUN_ID="corrupt")))
    assert str(bad) in last and "magic" in last and str(bad) in proc.stderr


def test_a_tokenizer_that_did_not_make_the_shards_is_caught(demo_data_dir, tmp_path_factory):
    """Another 512-piece tokenizer has the right size but splits text differently: the run stops before training."""
    import sentencepiece as spm

    other = tmp_path_factory.mktemp("other_tokenizer")
    text = other / "text.txt"
    docs = demo.make_demo_text(3000, seed=11)
    text.write_text("\n".join(docs + [d[::-1] for d in docs]), encoding="utf-8")  # other text, other merges
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(other / "other"), vocab_size=512,
                                   model_type="bpe", pad_id=0, bos_id=1, eos_id=2, unk_id=3,
                                   add_dummy_prefix=False, num_threads=1, minloglevel=2)
    env = dict(data_env(demo_data_dir), **dict(RUN_ENV, RUN_ID="wrong_tok"), TOKENIZER_PATH=str(other / "other.model"))
    _, last = failed_run(tmp_path_factory, "wrong_tok", env)
    assert "does not reproduce the validation tokens" in last and "other.model" in last


def test_an_artifact_pointing_nowhere_is_named(demo_data_dir, tmp_path_factory):
    workdir = new_workdir(tmp_path_factory, "nowhere")
    proc = run_evaluate(workdir, clean_env(**data_env(demo_data_dir), **EVAL_ENV, RUN_ID="nowhere"),
                        "--artifact", "/no/such/model.ptz")
    last = (workdir / "logs" / "nowhere.txt").read_text(encoding="utf-8").rstrip("\n").rsplit("\n", 1)[-1]
    assert proc.returncode != 0 and last.startswith("ERROR: ")
    assert "--artifact /no/such/model.ptz" in last and "no such file" in last


@pytest.mark.parametrize("content", [b"not a checkpoint at all", b"PK\x03\x04" + bytes(100)])
def test_a_corrupt_checkpoint_gets_one_line_naming_it(demo_data_dir, tmp_path_factory, content):
    workdir = new_workdir(tmp_path_factory, "corrupt")
    bad = workdir / "bad.pt"
    bad.write_bytes(content)
    proc = run_evaluate(workdir, clean_env(**data_env(demo_data_dir), **EVAL_ENV, RUN_ID="corrupt"),
                        "--checkpoint", str(bad))
    last = (workdir / "logs" / "corrupt.txt").read_text(encoding="utf-8").rstrip("\n").rsplit("\n", 1)[-1]
    assert proc.returncode != 0 and last.startswith("ERROR: ValueError: checkpoint ") and str(bad) in last
    assert "is not a checkpoint of this script" in last and "weights_only" not in last


def test_arguments_are_refused_and_unpack_points_to_pack_py(demo_data_dir, tmp_path_factory):
    """Every setting is an environment variable: `python3 train_gpt.py --unpack` (on a packed script, as one might
    try) must not start a training run."""
    env = dict(data_env(demo_data_dir), **dict(RUN_ENV, RUN_ID="args"))
    workdir = new_workdir(tmp_path_factory, "args")
    proc = subprocess.run([sys.executable, "train_gpt.py", "--unpack"], cwd=workdir, env=clean_env(**env),
                          capture_output=True, text=True, timeout=HANG_TIMEOUT)
    last = (workdir / "logs" / "args.txt").read_text(encoding="utf-8").rstrip("\n").rsplit("\n", 1)[-1]
    assert proc.returncode != 0 and last.startswith("ERROR: ") and "takes no arguments" in last
    assert "scripts/pack.py --unpack" in last and "train_loss" not in proc.stdout


def test_no_data_and_no_gpu_points_to_the_demo(tmp_path_factory):
    workdir = new_workdir(tmp_path_factory, "nodata")
    proc = run_script(workdir, clean_env(RUN_ID="nodata", VOCAB_SIZE="512"))
    last = (workdir / "logs" / "nodata.txt").read_text(encoding="utf-8").rstrip("\n").rsplit("\n", 1)[-1]
    assert proc.returncode != 0 and "no val shards match ./data/datasets/fineweb10B_sp512" in last
    assert "python3 scripts/demo.py" in last


def test_the_competition_model_on_a_cpu_stops_with_the_way_out(demo_data_dir, tmp_path_factory):
    """DATA_PATH without CUDA leaves the competition defaults in place; a model far too large for this machine
    stops before training, saying why and what to do."""
    env = dict(data_env(demo_data_dir), VOCAB_SIZE="512", RUN_ID="cpu_big", MODEL_DIM="2048", NUM_HEADS="16",
               NUM_LAYERS="32", WARMUP_STEPS="0")
    _, last = failed_run(tmp_path_factory, "cpu_big", env)
    assert "no CUDA device" in last and "GiB" in last and "scripts/demo.py" in last


def test_reusing_a_run_id_keeps_the_earlier_log(demo_data_dir, tmp_path_factory):
    workdir = new_workdir(tmp_path_factory, "reuse")
    env = clean_env(**data_env(demo_data_dir), **dict(RUN_ENV, RUN_ID="same"), SSM_MODE="bogus")
    for attempt in range(2):
        run_script(workdir, env)
        if attempt == 0:
            first = (workdir / "logs" / "same.txt").read_text(encoding="utf-8")
    assert (workdir / "logs" / "same.1.txt").read_text(encoding="utf-8") == first
    assert (workdir / "logs" / "same.1.json").is_file()
    second = (workdir / "logs" / "same.txt").read_text(encoding="utf-8").split("=" * 100, 1)[1]
    assert second.count("ERROR: ") == 1 and "the earlier logs/same.txt is kept as logs/same.1.txt" in second


def test_an_empty_run_id_is_no_run_id(demo_data_dir, tmp_path_factory):
    workdir = new_workdir(tmp_path_factory, "empty_id")
    proc = run_script(workdir, clean_env(**data_env(demo_data_dir), **dict(
        RUN_ENV, RUN_ID="", ITERATIONS="2", WARMUP_STEPS="0", EVAL_STRIDE="0", TTT_MODE="off")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = list((workdir / "logs").glob("*.txt"))
    assert len(logs) == 1 and len(logs[0].stem) == 36  # a fresh uuid names the log...
    facts = json.loads(logs[0].with_suffix(".json").read_text(encoding="utf-8"))
    assert facts["run_id"] == logs[0].stem and facts["config"]["RUN_ID"] == logs[0].stem  # ... the run ...
    assert [p.name for p in (workdir / "checkpoints").iterdir()] == [f"{logs[0].stem}.pt"]  # ... and its checkpoint


def test_the_same_seed_gives_the_same_numbers_on_a_busy_machine(demo_data_dir, tmp_path_factory):
    """Runs bounded by steps (as the demo is) do not depend on the machine's speed: two runs started together,
    competing for the same cores, log the same losses and scores."""
    env = clean_env(**data_env(demo_data_dir), **dict(RUN_ENV, ITERATIONS="6", WARMUP_STEPS="0", TRAIN_LOG_EVERY="1",
                                                      CHECKPOINT_PATH="", EVAL_STRIDE="0", TTT_MODE="off",
                                                      VAL_MAX_TOKENS="4000"), OMP_NUM_THREADS="1")
    dirs = [new_workdir(tmp_path_factory, f"busy{i}") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "train_gpt.py"], cwd=d, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for d in dirs]
    outs = [p.communicate(timeout=HANG_TIMEOUT) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-3000:]
    numbers = [re.findall(r"(?:train_loss|val_loss|val_bpb):[0-9.]+", out) for out, _ in outs]
    assert len(numbers[0]) > 10 and numbers[0] == numbers[1]
    knobs = tg.Hyperparameters(env=demo.demo_environment(Path("data"), {}))
    assert knobs.max_wallclock_seconds == 0 and knobs.iterations <= 100  # the demo is bounded by steps


def test_the_demo_is_one_command_and_keeps_its_outputs_in_its_own_folder(tmp_path_factory):
    """The README's first command, in a fresh copy of the two files it needs (shortened by the environment, which
    wins over the demo's knobs): data, logs, checkpoint and artifact all land under demo/, twice without loss."""
    root = tmp_path_factory.mktemp("fresh_clone")
    (root / "scripts").mkdir()
    shutil.copy(SCRIPT_PATH, root / "train_gpt.py")
    shutil.copy(REPO_ROOT / "scripts" / "demo.py", root / "scripts" / "demo.py")
    env = clean_env(ITERATIONS="3", EVAL_STRIDE="0", TTT_MODE="off", VAL_MAX_TOKENS="3000", RUN_ID="demo")
    for _ in range(2):
        proc = subprocess.run([sys.executable, "scripts/demo.py"], cwd=root, env=env, capture_output=True, text=True,
                              timeout=HANG_TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "final_int8_roundtrip_exact" in proc.stdout and "valid:False" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == ["demo", "scripts", "train_gpt.py"]
    demo_dir = root / "demo"
    assert {"data", "logs", "checkpoints", "final_model.ptz", "final_model.1.ptz"} <= {p.name for p in demo_dir.iterdir()}
    assert (demo_dir / "logs" / "demo.txt").is_file() and (demo_dir / "logs" / "demo.1.txt").is_file()
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--help"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=HANG_TIMEOUT)  # an argument would be ignored: it is refused, at once
    assert proc.returncode == 1 and "takes no arguments" in proc.stderr and "demo:" not in proc.stdout
