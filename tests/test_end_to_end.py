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
from conftest import SCRIPT_PATH

RUN_ENV = {
    "NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2", "NUM_KV_HEADS": "1", "VOCAB_SIZE": "512",
    "TRAIN_SEQ_LEN": "64", "EVAL_SEQ_LEN": "64", "EVAL_STRIDE": "32", "TRAIN_BATCH_TOKENS": "2048",
    "ITERATIONS": "20", "MAX_WALLCLOCK_SECONDS": "0", "WARMUP_STEPS": "2", "SSM_LAYERS": "0",
    "SSM_KERNEL_SIZE": "16", "VE_LAYERS": "1", "XSA_LAST_N": "1", "BIGRAM_VOCAB_SIZE": "128", "BIGRAM_DIM": "16",
    "VE_DIM": "16", "GPTQ_CALIB_SEQS": "8", "VAL_MAX_TOKENS": "20000", "RUN_ID": "e2e",
}
# data and evaluation only: in eval-only mode the artifact must supply the model's shape
EVAL_ENV = {k: RUN_ENV[k] for k in ("VOCAB_SIZE", "EVAL_SEQ_LEN", "EVAL_STRIDE", "VAL_MAX_TOKENS")}
EXACT = re.compile(r"^(final_int5_\w+_exact) val_loss:([0-9.]+) val_bpb:([0-9.]+)$", re.M)


def clean_env(**extra: str) -> dict[str, str]:
    """The parent environment without any of the script's knobs or torchrun variables, then `extra`."""
    knobs = set(tg.Hyperparameters(env={}).values)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(tg.OWNED_PREFIXES) and k not in knobs
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


def run_script(workdir: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "train_gpt.py"], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout)


def new_workdir(tmp_path_factory, name: str) -> Path:
    d = tmp_path_factory.mktemp(name)
    shutil.copy(SCRIPT_PATH, d / "train_gpt.py")
    return d


def data_env(demo: Path) -> dict[str, str]:
    return {"DATA_PATH": str(demo), "TOKENIZER_PATH": str(demo / "demo_512_bpe.model")}


@pytest.fixture(scope="module")
def run(demo_data_dir, tmp_path_factory):
    workdir = new_workdir(tmp_path_factory, "e2e_train")
    proc = run_script(workdir, clean_env(**data_env(demo_data_dir), **RUN_ENV))
    assert proc.returncode == 0, f"training run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    log = (workdir / "logs" / "e2e.txt").read_text(encoding="utf-8")
    facts = json.loads((workdir / "logs" / "e2e.json").read_text(encoding="utf-8"))
    code = (workdir / "train_gpt.py").read_bytes()
    source = code.decode("utf-8")
    assert source in log  # the exact source is archived with the run
    body = log.replace(source, "", 1)  # what the run itself logged
    return SimpleNamespace(workdir=workdir, proc=proc, log=log, body=body, facts=facts, code=code,
                           artifact=workdir / "final_model.int5.ptz")


def exact_lines(log: str) -> dict[str, tuple[str, float, float]]:
    return {m.group(1): (m.group(0), float(m.group(2)), float(m.group(3))) for m in EXACT.finditer(log)}


def test_training_run_log(run):
    log = run.body
    assert log.startswith("\n" + "=" * 100)  # the source comes first, then the separator
    for needle in ("step:1/20 train_loss:", "step:10/20 train_loss:", "train_summary steps:20",
                   "pre_export val_loss:", "final_int5_roundtrip_exact val_loss:",
                   "final_int5_sliding_window_exact val_loss:", "Total submission size int5+lzma:",
                   "warmup_step:2/2", "kernel_report layer:0 kind:fir"):
        assert needle in log, needle
    assert "Traceback" not in run.proc.stderr
    # console output is the log minus the archived source
    assert "final_int5_sliding_window_exact val_loss:" in run.proc.stdout


def test_final_training_step_is_logged(run):
    assert "step:20/20 train_loss:" in run.body


def test_artifact_and_sizes(run):
    assert run.artifact.is_file()
    size = run.artifact.stat().st_size
    total = size + len(run.code)
    logged = re.search(r"Total submission size int5\+lzma: (\d+) bytes", run.body)
    assert logged and int(logged.group(1)) == total
    assert re.search(rf"Serialized model int5\+lzma: {size} bytes", run.body)
    assert re.search(rf"Code size: {len(run.code)} bytes", run.body)
    f = run.facts
    assert f["bytes_total"] == total and f["bytes_model"] == size and f["bytes_code"] == len(run.code)
    assert f["under_limit"] is (total <= 16_000_000) is True
    # the artifact on disk is a loadable artifact with the run's shape
    artifact = tg.deserialize_artifact(run.artifact.read_bytes())
    assert artifact["config"]["NUM_LAYERS"] == "2" and artifact["config"]["SSM_LAYERS"] == "0"


def test_facts_json(run):
    f, lines = run.facts, exact_lines(run.log)
    _, sw_loss, sw_bpb = lines["final_int5_sliding_window_exact"]
    _, rt_loss, rt_bpb = lines["final_int5_roundtrip_exact"]
    assert f["status"] == "evaluated" and f["steps"] == 20 and f["run_id"] == "e2e"
    assert f["val_bpb"] == pytest.approx(sw_bpb, abs=1e-8) and f["val_loss"] == pytest.approx(sw_loss, abs=1e-8)
    assert f["results"]["roundtrip"]["val_bpb"] == pytest.approx(rt_bpb, abs=1e-8)
    assert f["results"]["sliding_window"]["val_bpb"] == pytest.approx(sw_bpb, abs=1e-8)
    assert f["val_tokens"] == 20000 - 1
    c = f["compliance"]
    for flag in ("train_under_600s", "artifact_under_16mb", "eval_under_600s", "no_val_data_in_training",
                 "score_first", "no_ttt"):
        assert isinstance(c[flag], bool), flag
    assert c["artifact_under_16mb"] is f["under_limit"] is True
    assert c["eval_under_600s"] is (f["eval_time_seconds"] <= 600)
    assert f["valid"] is (f["under_limit"] and f["calibration_within_wallclock"])
    assert f["config"]["ITERATIONS"] == "20" and f["config"]["SSM_LAYERS"] == "0"
    # bpb = loss / ln 2 * tokens / bytes, with the logged token and byte counts
    assert sw_bpb == pytest.approx(sw_loss / math.log(2) * f["val_tokens"] / f["val_bytes"], rel=1e-6)


def test_model_learned_and_round_trip_is_close(run):
    f = run.facts
    pre = re.search(r"pre_export val_loss:([0-9.]+) val_bpb:([0-9.]+)", run.body)
    assert pre and float(pre.group(2)) == pytest.approx(f["pre_quant_val_bpb"], abs=1e-4)
    assert f["pre_quant_val_loss"] < math.log(512) - 1.0  # well below a uniform guess over 512 tokens
    assert abs(f["results"]["roundtrip"]["val_bpb"] - f["pre_quant_val_bpb"]) < 0.05


def test_eval_only_reproduces_round_trip(run, demo_data_dir, tmp_path_factory):
    workdir = new_workdir(tmp_path_factory, "e2e_eval")
    env = clean_env(**data_env(demo_data_dir), **EVAL_ENV, RUN_ID="e2e_eval", EVAL_ARTIFACT=str(run.artifact))
    proc = run_script(workdir, env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = (workdir / "logs" / "e2e_eval.txt").read_text(encoding="utf-8")
    before, after = exact_lines(run.log), exact_lines(log)
    assert set(after) == {"final_int5_roundtrip_exact", "final_int5_sliding_window_exact"}
    for key in after:
        assert after[key][0] == before[key][0]
    console = proc.stdout  # the log without the archived source code
    assert "final_int5_roundtrip_exact" in console
    assert "train_loss" not in console and "Serialized model" not in console  # nothing trained or exported
    assert not (workdir / "final_model.int5.ptz").exists()
    facts = json.loads((workdir / "logs" / "e2e_eval.json").read_text(encoding="utf-8"))
    assert facts["status"] == "evaluated" and facts["bytes_total"] == run.facts["bytes_total"]
    assert facts["results"]["roundtrip"]["val_bpb"] == run.facts["results"]["roundtrip"]["val_bpb"]


def test_bad_environment_fails_fast(demo_data_dir, tmp_path_factory):
    workdir = new_workdir(tmp_path_factory, "e2e_badenv")
    start = time.perf_counter()
    proc = run_script(workdir, clean_env(**data_env(demo_data_dir), **RUN_ENV, SSM_MODE="bogus"), timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    assert "SSM_MODE" in proc.stderr and "bogus" in proc.stderr
    assert elapsed < 60
    assert not (workdir / "logs").exists()  # it stopped before writing anything


def test_corrupt_validation_shard_is_named(demo_data_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("corrupt_data")
    for name in ("demo_512_bpe.model", "fineweb_train_000000.bin"):
        (data / name).symlink_to(demo_data_dir / name)
    bad = data / "fineweb_val_000000.bin"
    raw = bytearray((demo_data_dir / "fineweb_val_000000.bin").read_bytes())
    raw[:4] = np.array([12345], dtype="<i4").tobytes()
    bad.write_bytes(bytes(raw))
    workdir = new_workdir(tmp_path_factory, "e2e_corrupt")
    proc = run_script(workdir, clean_env(**data_env(data), **dict(RUN_ENV, RUN_ID="corrupt")), timeout=120)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr and "magic" in proc.stderr
    assert not (workdir / "final_model.int5.ptz").exists()
