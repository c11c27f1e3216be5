"""Tests of records/summarize_seeds.py (t distribution, folder summary), of the record folders in records/ and of
scripts/pack.py."""
import ast
import base64
import importlib.util
import io
import json
import lzma
import math
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO_ROOT as ROOT

_spec = importlib.util.spec_from_file_location("summarize_seeds", ROOT / "records" / "summarize_seeds.py")
ss = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ss)
_pack_spec = importlib.util.spec_from_file_location("pack", ROOT / "scripts" / "pack.py")
pack = importlib.util.module_from_spec(_pack_spec)
_pack_spec.loader.exec_module(pack)

SEP = ss.SEPARATOR
SIZE_LIMIT = 16_000_000


# ---------------------------------------------------------------- Student t CDF

@pytest.mark.parametrize("df", [1, 2, 3, 4, 7.5, 30, 1000])
def test_t_cdf_is_one_half_at_zero(df):
    assert ss.t_cdf(0.0, df) == pytest.approx(0.5, abs=1e-15)


def test_t_cdf_cauchy_df1():
    assert ss.t_cdf(1.0, 1) == pytest.approx(0.75, abs=1e-12)
    for t in (-30.0, -2.5, -0.3, 0.1, 1.7, 12.0):
        assert ss.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)


def test_t_cdf_df2_closed_form():
    assert ss.t_cdf(2.0, 2) == pytest.approx(0.5 + 2 / (2 * math.sqrt(6)), abs=1e-12)
    for t in (-9.0, -1.1, 0.4, 3.3, 50.0):
        assert ss.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_t_cdf_df3_closed_form():
    for t in (-4.0, -0.7, 0.9, 2.2, 8.0):
        u = t / math.sqrt(3)
        expected = 0.5 + (u / (1 + u * u) + math.atan(u)) / math.pi
        assert ss.t_cdf(t, 3) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("df", [5, 9, 25])
def test_t_cdf_matches_numerical_integral_of_the_density(df):
    t = 1.9
    x = np.linspace(0.0, t, 20001)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_c) * (1 + x * x / df) ** (-(df + 1) / 2)
    h = x[1] - x[0]
    simpson = h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum())
    assert ss.t_cdf(t, df) == pytest.approx(0.5 + simpson, abs=1e-10)


def test_t_cdf_large_df_approaches_normal():
    for t in (-3.0, -1.0, 0.5, 1.96, 2.5):
        assert ss.t_cdf(t, 1000) == pytest.approx(0.5 * (1 + math.erf(t / math.sqrt(2))), abs=1e-3)


def test_t_critical_value_df4():
    assert 1 - ss.t_cdf(3.747, 4) == pytest.approx(0.01, abs=2e-4)  # one-sided table value t_{0.01, 4} = 3.747


def test_t_cdf_monotone_and_symmetric():
    ts = np.linspace(-6, 6, 61)
    values = [ss.t_cdf(float(t), 3) for t in ts]
    assert all(b > a for a, b in zip(values, values[1:]))
    for t in ts:
        assert ss.t_cdf(float(t), 3) + ss.t_cdf(float(-t), 3) == pytest.approx(1.0, abs=1e-13)


# ---------------------------------------------------------------- synthetic run folders

FAKE_SOURCE = ('"""fake train_gpt.py"""\n'
               'def report(tag, loss, bpb):\n'
               '    log0(f"{tag}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")\n'
               'final_int5_sliding_window_exact val_loss:9.99999999 val_bpb:9.99999999\n')
# What the run facts of train_gpt.py state from now on (older facts lack some of these: see the tests below).
NEW_FLAGS = ("wallclock_cap_set", "train_under_600s", "calibration_within_wallclock", "no_val_data_in_training",
             "official_validation_split", "eight_h100", "eval_under_600s", "artifact_under_16mb", "score_first",
             "finite_score")
OFFICIAL_COMPLIANCE = ("train_under_600s", "artifact_under_16mb", "eval_under_600s", "no_slot", "no_pre_quant_ttt",
                       "no_etlb", "no_ngram_cache", "score_first_ttt", "three_seeds")


def write_run(folder: Path, stem: str, seed: int, loss: float, bpb: float, source: str = FAKE_SOURCE,
              log_loss: float | None = None, *, extra_lines: tuple = (), ttt: dict | None = None,
              drop_flags: tuple = (), **facts_overrides) -> None:
    """A fake run as train_gpt.py writes it: logs <stem>.txt (source, separator, log lines) and <stem>.json.
    extra_lines go before the final passes; ttt (the facts of a TTT pass) adds that pass as the headline;
    drop_flags are compliance flags the facts do not state; facts_overrides replace top-level facts."""
    log_loss = loss if log_loss is None else log_loss
    head = (loss, bpb) if ttt is None else (loss + 0.01, bpb + 0.005)  # with TTT, the sliding pass is not last
    lines = [source, SEP, "hyperparameters:", f"  RUN_ID: {stem}", f"  SEED: {seed}", "  VAL_MAX_TOKENS: 0",
             "step:100/20000 train_loss:3.1 train_time:1000ms step_avg:10.00ms", *extra_lines,
             f"final_int5_roundtrip_exact val_loss:{loss + 0.04:.8f} val_bpb:{bpb + 0.02:.8f}",
             f"final_int5_sliding_window val_loss:{log_loss:.4f} val_bpb:{bpb:.4f} seq_len:2048 stride:64",
             f"final_int5_sliding_window_exact val_loss:{(log_loss if ttt is None else head[0]):.8f} "
             f"val_bpb:{head[1]:.8f}"]
    if ttt is not None:
        lines.append(f"final_int5_ttt_exact val_loss:{log_loss:.8f} val_bpb:{bpb:.8f}")
    lines.append(f"submission_facts:logs/{stem}.json valid:True")
    (folder / f"{stem}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    compliance = {flag: True for flag in NEW_FLAGS if flag not in drop_flags}
    compliance["calibration"] = "training shards, inside the training wall clock"
    results = {"roundtrip": {"val_loss": loss + 0.04, "val_bpb": bpb + 0.02, "eval_seconds": 3.0},
               "sliding_window": {"val_loss": head[0], "val_bpb": head[1], "eval_seconds": 80.0}}
    if ttt is not None:
        results["ttt"] = dict(ttt, val_loss=loss, val_bpb=bpb, eval_seconds=300.0)
    facts = {"run_id": stem, "seed": seed, "status": "evaluated", "steps": 5000 + seed % 7,
             "step_avg_ms": 110.0 + seed % 3, "train_time_ms": 590000.0, "train_plus_calibration_s": 598.5,
             "bytes_code": len(source.encode()), "bytes_model": 15_000_000 + seed, "valid": True,
             "valid_except_hardware_and_data": True, "broken_rules": [],
             "bytes_total": 15_000_000 + seed + len(source.encode()), "val_loss": loss, "val_bpb": bpb,
             "results": results, "eval_time_seconds": 83.0, "compliance": compliance,
             "hardware": "8x NVIDIA H100 80GB HBM3", "pytorch_version": "2.11.0+cu130",
             "pre_quant_val_loss": loss - 0.01, "pre_quant_val_bpb": bpb - 0.005, "config": {"VAL_MAX_TOKENS": "0"}}
    facts.update(facts_overrides)
    (folder / f"{stem}.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")


LOSSES = {1337: 1.90123456789, 42: 1.90456789012, 2025: 1.89987654321}
BPBS = {1337: 1.12601234567, 42: 1.12799876543, 2025: 1.12519876543}
SCORE_FIRST_TTT = {"method": "score-first chunked SGD on all weights", "score_first": True,
                   "on": "dequantized artifact"}


def three_runs(folder: Path, source: str = FAKE_SOURCE, seeds=tuple(LOSSES), **run_options) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        write_run(folder, f"seed{seed}", seed, LOSSES[seed], BPBS[seed], source=source, **run_options)
    return folder


def files_of(folder: Path) -> dict:
    """Every file under folder with its bytes: what a test compares before and after."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_summary_of_three_runs(tmp_path):
    three_runs(tmp_path)
    sub = ss.summarize(tmp_path, reference_loss=1.92, margin=0.005, meta={"author": "a", "name": "n"})
    assert (tmp_path / "results.md").is_file()
    assert json.loads((tmp_path / "submission.json").read_text()) == sub
    losses, bpbs = np.array(list(LOSSES.values())), np.array(list(BPBS.values()))
    assert sub["val_loss"] == pytest.approx(losses.mean(), abs=1e-12)
    assert sub["val_bpb"] == pytest.approx(bpbs.mean(), abs=1e-12)
    assert sub["val_loss_std"] == pytest.approx(losses.std(ddof=1), abs=1e-12)
    assert sub["val_bpb_std"] == pytest.approx(bpbs.std(ddof=1), abs=1e-12)
    assert sub["pre_quant_val_loss"] == pytest.approx(losses.mean() - 0.01, abs=1e-12)
    assert sub["seeds"] == sorted(LOSSES)
    assert sub["seed_results"]["42"]["val_loss"] == LOSSES[42]
    assert sub["bytes_total"] == max(15_000_000 + s + len(FAKE_SOURCE.encode()) for s in LOSSES)
    test = sub["t_test"]
    t = (1.92 - 0.005 - losses.mean()) / (losses.std(ddof=1) / math.sqrt(3))
    assert (test["n"], test["df"]) == (3, 2) and test["t"] == pytest.approx(t, rel=1e-12)
    assert 0 < test["p"] < 0.01
    assert test["p"] == pytest.approx(1 - (0.5 + t / (2 * math.sqrt(2 + t * t))), rel=1e-9)  # df=2 closed form
    assert sub["track"] == "10min_16mb"
    assert all(sub["compliance"][flag] is True for flag in NEW_FLAGS + OFFICIAL_COMPLIANCE if flag != "score_first_ttt")
    assert sub["compliance"]["score_first_ttt"] is None and sub["compliance"]["no_ttt"] is True
    assert sub["compliance"]["calibration"] == "training shards, inside the training wall clock"
    md = (tmp_path / "results.md").read_text()
    assert "| 42 |" in md and "p < 0.01" in md and f"{sub['val_loss']:.8f}" in md
    assert "not a record" not in md.lower()


def test_p_decreases_as_reference_loss_rises(tmp_path):
    three_runs(tmp_path / "runs")
    ps = [ss.summarize(tmp_path / "runs", reference_loss=ref, output_dir=tmp_path / str(ref), non_record=True)
          ["t_test"]["p"] for ref in (1.905, 1.91, 1.92, 1.95)]
    assert all(0 < p < 1 for p in ps)
    assert all(b < a for a, b in zip(ps, ps[1:]))


def test_json_log_disagreement_names_the_file(tmp_path):
    three_runs(tmp_path)
    write_run(tmp_path, "seed42", 42, LOSSES[42], BPBS[42], log_loss=LOSSES[42] + 1e-6)
    with pytest.raises(ss.RecordError, match="seed42.txt"):
        ss.summarize(tmp_path, reference_loss=1.92)
    assert ss.main([str(tmp_path), "--reference-loss", "1.92"]) == 1


def test_single_run_has_no_p_and_no_std(tmp_path):
    write_run(tmp_path, "only", 7, 1.9, 1.12)
    sub = ss.summarize(tmp_path, reference_loss=1.95, non_record=True)
    assert sub["val_loss_std"] is None and sub["val_bpb_std"] is None
    assert sub["t_test"]["p"] is None and sub["t_test"]["t"] is None and sub["t_test"]["n"] == 1
    assert "not computable (needs at least 2 seeds)" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "submission.json").read_text())["t_test"]["p"] is None


def test_identical_losses_give_no_p(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path, f"s{seed}", seed, 1.9, 1.12)
    sub = ss.summarize(tmp_path, reference_loss=1.95, non_record=True)
    assert sub["val_loss_std"] == 0.0 and sub["t_test"]["p"] is None and sub["t_test"]["n"] == 2


def test_unpaired_files_are_reported(tmp_path):
    three_runs(tmp_path)
    (tmp_path / "crashed.txt").write_text(FAKE_SOURCE + SEP + "\nstep:1/2\n")
    (tmp_path / "orphan.json").write_text("{}")
    warnings = []
    sub = ss.summarize(tmp_path, reference_loss=1.92, warn=warnings.append)
    assert sub["seeds"] == sorted(LOSSES)
    assert any("crashed.txt" in w for w in warnings) and any("orphan.json" in w for w in warnings)


def test_duplicate_seed_is_an_error(tmp_path):
    three_runs(tmp_path)
    write_run(tmp_path, "again", 42, 1.9, 1.12)
    with pytest.raises(ss.RecordError, match="seed 42"):
        ss.summarize(tmp_path, reference_loss=1.92)


def test_cli_writes_both_files(tmp_path, capsys):
    three_runs(tmp_path)
    assert ss.main([str(tmp_path), "--reference-loss", "1.92", "--margin", "0.001", "--github-id", "gh",
                    "--author", "A", "--name", "N", "--blurb", "B"]) == 0
    sub = json.loads((tmp_path / "submission.json").read_text())
    assert (sub["github_id"], sub["author"], sub["name"], sub["blurb"]) == ("gh", "A", "N", "B")
    assert (sub["track"], sub["t_test"]["margin"]) == ("10min_16mb", 0.001)
    assert "wrote" in capsys.readouterr().out


# ---------------------------------------------------------------- what the summary may claim

def test_existing_results_are_never_overwritten(tmp_path, capsys):
    """A folder's submission.json or results.md is never rewritten: the summary refuses and says so."""
    for existing in ("submission.json", "results.md"):
        folder = three_runs(tmp_path / existing)
        (folder / existing).write_text("written by hand\n")
        before = files_of(folder)
        assert ss.main([str(folder), "--reference-loss", "1.92"]) != 0
        assert files_of(folder) == before
        err = capsys.readouterr().err
        assert existing in err and "--output-dir" in err and "exist" in err
        with pytest.raises(ss.RecordError, match="exists"):
            ss.summarize(folder, reference_loss=1.92)
        assert files_of(folder) == before


def test_output_dir_receives_the_summary_and_the_folder_stays_as_it_was(tmp_path, capsys):
    folder = three_runs(tmp_path / "runs")
    (folder / "submission.json").write_text("{}\n")
    before = files_of(folder)
    out = tmp_path / "out"
    assert ss.main([str(folder), "--reference-loss", "1.92", "--output-dir", str(out)]) == 0
    assert files_of(folder) == before
    assert sorted(files_of(out)) == ["results.md", "submission.json"]
    assert str(out / "submission.json") in capsys.readouterr().out
    # an output folder that already holds a summary is refused like the run folder
    written = files_of(out)
    assert ss.main([str(folder), "--reference-loss", "1.92", "--output-dir", str(out)]) != 0
    assert files_of(out) == written and "exist" in capsys.readouterr().err


AUTHOR = {"author": "A", "github_id": "a", "blurb": "b"}


def test_track_names_are_the_records(tmp_path):
    """The records write "10min_16mb" / "non_record_16mb", not the folder name "track_..."; a submission in the
    other track's folder, or without its author's fields, is written with a warning that says so."""
    for track, non_record in (("10min_16mb", False), ("non_record_16mb", True)):
        other = "non_record_16mb" if track == "10min_16mb" else "10min_16mb"
        for where, meta in ((track, AUTHOR), (other, {"author": "A"})):
            warnings = []
            folder = three_runs(tmp_path / track / "records" / f"track_{where}" / "2026-01-01_X")
            sub = ss.summarize(folder, reference_loss=1.92, non_record=non_record, meta=meta, warn=warnings.append)
            assert sub["track"] == track
            if where == track:
                assert warnings == []
            else:
                assert len(warnings) == 2 and f"in track_{other}/" in warnings[1] and f"track_{track}/" in warnings[1]
                assert "null for github_id, blurb: pass --github-id ... --blurb ..." in warnings[0]


def test_a_flag_a_run_does_not_state_is_not_stated_rather_than_false(tmp_path):
    three_runs(tmp_path, seeds=(1337, 42))
    write_run(tmp_path, "seed2025", 2025, LOSSES[2025], BPBS[2025], drop_flags=("wallclock_cap_set", "eight_h100"))
    write_run(tmp_path, "seed42", 42, LOSSES[42], BPBS[42], compliance={
        **{flag: True for flag in NEW_FLAGS}, "eval_under_600s": False, "official_validation_split": None})
    sub = ss.summarize(tmp_path, reference_loss=1.92, non_record=True, warn=lambda msg: None)
    compliance = sub["compliance"]
    assert compliance["wallclock_cap_set"] is None and compliance["eight_h100"] is None  # not stated by one run
    assert compliance["official_validation_split"] is None  # stated as not assessed: null stays null
    assert compliance["eval_under_600s"] is False and compliance["train_under_600s"] is True
    md = (tmp_path / "results.md").read_text()
    assert "wallclock_cap_set: not stated" in md and "eval_under_600s: False" in md
    assert "wallclock_cap_set=False" not in md and "wallclock_cap_set: False" not in md


def test_the_records_compliance_keys_are_computed_not_assumed(tmp_path):
    plain = ss.summarize(three_runs(tmp_path / "plain"), reference_loss=1.92)["compliance"]
    assert set(OFFICIAL_COMPLIANCE) <= set(plain)
    assert all(plain[k] is True for k in ("no_slot", "no_etlb", "no_ngram_cache", "no_pre_quant_ttt",
                                          "three_seeds", "no_ttt"))
    assert plain["score_first_ttt"] is None  # no TTT ran: nothing to be score-first about

    # a pass the script's plain passes do not include: nothing can be said about SLOT, ETLB or n-gram caches
    odd = three_runs(tmp_path / "odd", extra_lines=("final_int5_slot_exact val_loss:1.80000000 "
                                                    "val_bpb:1.05000000",))
    odd_c = ss.summarize(odd, reference_loss=1.92, non_record=True, warn=lambda m: None)["compliance"]
    assert odd_c["no_slot"] is None and odd_c["no_etlb"] is None and odd_c["no_ngram_cache"] is None
    assert "not stated" in (odd / "results.md").read_text()

    ttt = ss.summarize(three_runs(tmp_path / "ttt", ttt=SCORE_FIRST_TTT), reference_loss=1.92)
    assert ttt["compliance"]["score_first_ttt"] is True and ttt["compliance"]["no_ttt"] is False
    assert ttt["compliance"]["no_pre_quant_ttt"] is True and ttt["compliance"]["no_slot"] is True
    assert ttt["seed_results"]["42"]["val_loss"] == LOSSES[42]

    older = dict(SCORE_FIRST_TTT)
    del older["on"]  # facts older than the "on" key do not say what the TTT pass adapted
    older_c = ss.summarize(three_runs(tmp_path / "older", ttt=older), reference_loss=1.92,
                           non_record=True, warn=lambda m: None)["compliance"]
    assert older_c["no_pre_quant_ttt"] is None and older_c["score_first_ttt"] is True

    late = ss.summarize(three_runs(tmp_path / "late", ttt=dict(SCORE_FIRST_TTT, score_first=False)),
                        reference_loss=1.92, non_record=True, warn=lambda m: None)["compliance"]
    assert late["score_first_ttt"] is False and late["no_slot"] is None

    two = ss.summarize(three_runs(tmp_path / "two", seeds=(1337, 42)), reference_loss=1.92, non_record=True,
                       warn=lambda m: None)["compliance"]
    assert two["three_seeds"] is False


@pytest.mark.parametrize("case", ["two seeds", "invalid run"])
def test_no_record_submission_without_three_valid_seeds(tmp_path, capsys, case):
    if case == "two seeds":
        folder, reason = three_runs(tmp_path / "runs", seeds=(1337, 42)), "3 seeds"
    else:
        folder = three_runs(tmp_path / "runs")
        write_run(folder, "seed42", 42, LOSSES[42], BPBS[42], valid=False,
                  broken_rules=["training + calibration took 612.0s"])
        reason = "612.0s"
    before = files_of(folder)
    assert ss.main([str(folder), "--reference-loss", "1.92"]) != 0
    assert files_of(folder) == before  # nothing written
    err = capsys.readouterr().err
    assert reason in err and "--non-record" in err
    assert ss.main([str(folder), "--reference-loss", "1.92", "--non-record"]) == 0
    sub = json.loads((folder / "submission.json").read_text())
    assert sub["track"] == "non_record_16mb" and any(reason in r for r in sub["not_a_record_because"])
    first_lines = "\n".join((folder / "results.md").read_text().splitlines()[:4])
    assert "not a record submission" in first_lines.lower() and reason in first_lines


def test_no_record_submission_when_the_t_test_does_not_support_it(tmp_path, capsys):
    folder = three_runs(tmp_path)
    assert ss.main([str(folder), "--reference-loss", "1.905"]) != 0  # mean 1.9019 is not 0.005 below 1.905
    assert "p < 0.01" in capsys.readouterr().err and not (folder / "submission.json").exists()


def test_submission_keys_are_the_records(tmp_path):
    """Key names as the official records write them (and as the frozen folder's submission.json holds them)."""
    sub = ss.summarize(three_runs(tmp_path), reference_loss=1.92)
    official = {"author", "github_id", "name", "blurb", "date", "track", "val_loss", "val_bpb", "val_loss_std",
                "val_bpb_std", "seeds", "seed_results", "bytes_total", "bytes_code", "hardware", "pytorch_version",
                "compliance", "pre_quant_val_loss", "pre_quant_val_bpb"}
    assert official <= set(sub)
    assert set(sub["seed_results"]["42"]) >= {"val_loss", "val_bpb", "artifact_bytes", "steps", "step_avg_ms",
                                              "eval_time_s"}
    frozen = json.loads((FROZEN / "submission.json").read_text())
    assert set(frozen) - {"t_test"} <= set(sub) and set(frozen["compliance"]) <= set(sub["compliance"])


FROZEN = ROOT / "records" / "track_non_record_16mb" / "2026-11-28_S4DLin_XSA_GPTQint5"


def test_the_frozen_folder_is_never_modified(tmp_path, capsys):
    before = files_of(FROZEN)
    assert ss.main([str(FROZEN), "--reference-loss", "2.2855", "--non-record"]) != 0
    assert "submission.json and" in capsys.readouterr().err
    assert ss.main([str(FROZEN), "--reference-loss", "2.2855", "--non-record", "--output-dir",
                    str(tmp_path / "out")]) == 0
    assert files_of(FROZEN) == before
    sub = json.loads((tmp_path / "out" / "submission.json").read_text())
    assert sub["track"] == "non_record_16mb" and sub["seeds"] == [42, 1337]
    compliance = sub["compliance"]
    # its facts predate these flags: not stated, never assumed
    assert compliance["eight_h100"] is None and compliance["official_validation_split"] is None
    assert compliance["three_seeds"] is False and compliance["score_first_ttt"] is None


# ---------------------------------------------------------------- record folders records/<track>/<name>/

def record_folder_problems(folder: Path) -> list:
    """What is wrong with one record folder holding a submission.json (empty list: nothing). The folder's
    train_gpt.py must be byte-identical to the source archived in each of its logs: the record is rerun from it."""
    try:
        sub = json.loads((folder / "submission.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [f"{folder}/submission.json does not parse: {err}"]
    problems = []
    code = folder / "train_gpt.py"
    code_bytes = code.read_bytes() if code.is_file() else None
    if code_bytes is None:
        problems.append(f"{code} is missing")
    logged = {}  # seed -> (val_loss, val_bpb) of the last *_exact line of each log
    for log in folder.glob("*.txt"):
        text = log.read_text(encoding="utf-8")
        if ss.SEPARATOR in text and ss.log_source(text).encode("utf-8") != code_bytes:
            problems.append(f"{log.name}: its archived source is not byte-identical to {code}")
        seeds, exact = ss.SEED_RE.findall(ss.log_body(text)), ss.last_exact(text)
        if seeds and exact:
            logged.setdefault(int(seeds[-1]), []).append((exact[1], exact[2], log.name))
    results = sub.get("seed_results", {})
    if not results:
        problems.append(f"{folder}: submission.json has no seed_results")
    for seed, res in results.items():
        if not any(abs(loss - res["val_loss"]) <= 1e-8 and abs(bpb - res["val_bpb"]) <= 1e-8
                   for loss, bpb, _ in logged.get(int(seed), [])):
            problems.append(f"{folder}: seed {seed} ({res['val_loss']}, {res['val_bpb']}) has no log whose last "
                            f"*_exact line gives it; logs of that seed: {logged.get(int(seed), [])}")
    if results and abs(sub.get("val_bpb", math.nan) - sum(r["val_bpb"] for r in results.values()) / len(results)) \
            > 1e-8:
        problems.append(f"{folder}: val_bpb {sub.get('val_bpb')} is not the mean of the seeds' val_bpb")
    if sub.get("track") not in (ss.TRACK_RECORD, ss.TRACK_NON_RECORD):
        problems.append(f"{folder}: track {sub.get('track')!r} is not one the records use "
                        f"({ss.TRACK_RECORD!r}, {ss.TRACK_NON_RECORD!r})")
    if str(sub.get("track")).endswith(ss.TRACK_RECORD) and len(results) < 3:
        problems.append(f"{folder}: a {ss.TRACK_RECORD} submission with {len(results)} seeds (a record needs 3)")
    if sub.get("compliance", {}).get("artifact_under_16mb") and not sub.get("bytes_total", math.inf) <= SIZE_LIMIT:
        problems.append(f"{folder}: bytes_total {sub.get('bytes_total')} > {SIZE_LIMIT} with artifact_under_16mb")
    return problems


def test_record_folder_check_on_a_synthetic_record(tmp_path):
    root_code = (ROOT / "train_gpt.py").read_bytes()
    folder = three_runs(tmp_path / "records" / "track_10min_16mb" / "2026-01-01_Test", source=root_code.decode())
    shutil.copyfile(ROOT / "train_gpt.py", folder / "train_gpt.py")
    warnings = []
    sub = ss.summarize(folder, reference_loss=1.92, meta=AUTHOR, warn=warnings.append)
    assert warnings == [] and sub["track"] == "10min_16mb" and sub["bytes_code"] == len(root_code)
    assert record_folder_problems(folder) == []
    sub = json.loads((folder / "submission.json").read_text())
    sub["val_bpb"] += 1e-6
    sub["seed_results"]["42"]["val_loss"] += 1e-6
    sub["bytes_total"] = SIZE_LIMIT + 1
    sub["track"] = "track_10min_16mb"
    sub["seed_results"].pop("2025")
    (folder / "submission.json").write_text(json.dumps(sub))
    (folder / "train_gpt.py").write_bytes(root_code + b"\n")
    problems = record_folder_problems(folder)
    # three numbers, the track's name, a record of two seeds, and each of the three logs names the script
    assert len(problems) == 3 + 2 + 3, problems
    with pytest.raises(ss.RecordError, match="differs from"):  # and the summary refuses to write from it
        ss.summarize(folder, reference_loss=1.92)


def test_a_record_of_the_packed_script(tmp_path):
    """A folder holding the packed script (scripts/pack.py) and logs that archived it passes; the readable source
    in its place is refused, since the logs did not run it."""
    source = (ROOT / "train_gpt.py").read_bytes()
    packed = pack.pack(source)
    folder = three_runs(tmp_path / "records" / "track_10min_16mb" / "2026-01-02_Packed", source=packed.decode())
    (folder / "train_gpt.py").write_bytes(packed)
    warnings = []
    sub = ss.summarize(folder, reference_loss=1.92, meta=AUTHOR, warn=warnings.append)
    assert warnings == [] and sub["bytes_code"] == len(packed) < len(source) / 2
    assert record_folder_problems(folder) == [] and pack.unpack(packed) == pack.strip_prose(source.decode()).encode()
    (folder / "train_gpt.py").write_bytes(source)
    with pytest.raises(ss.RecordError, match="differs from"):
        ss.summarize(folder, reference_loss=1.92)


def test_the_packed_script_keeps_its_source_for_inspect(tmp_path):
    """triton.jit reads a kernel's source through inspect: in a packed script that must find the unpacked lines
    (the one-line file on disk holds none of them). Without that, the packed script fails at import on a GPU."""
    program = 'import inspect\n\n\ndef kernel():\n    return 41 + 1\n\n\nprint(inspect.getsource(kernel), end="")\n'
    script = tmp_path / "prog.py"
    script.write_bytes(pack.pack(program.encode()))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == "def kernel():\n    return 41 + 1\n", done.stderr


def test_pack_refuses_sources_whose_lines_the_loader_would_misnumber_and_unpacks_earlier_scripts():
    for bad, reason in ((b"\xef\xbb\xbfx = 1\n", r"'\\ufeff'"), (b"x = 1\x0c\ny = 2\n", r"'\\x0c'"),
                        (b"x = 1\r\ny = 2\n", r"'\\r'"),
                        ("# coding: latin-1\nx = '\xe9'\n".encode("latin-1"), "not UTF-8")):
        with pytest.raises(ValueError, match=reason):
            pack.pack(bad)
    source = b"print('hi')\n"
    earlier = pack.EARLIER_LOADERS[0].format(base64.b85encode(lzma.compress(source)).decode()).encode()
    assert pack.unpack(earlier) == source and pack.unpack(pack.pack(source)) == source


PROSE = '''#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""The module's docstring,
over two lines."""
import math  # why math

HASH = "not # a comment"
TAG = f"#{len(HASH)} # {HASH!r}"  # a comment after an f-string


class Box:
    """The class's docstring."""

    size = 3  # why three
    # a comment line inside a class


class Marker:
    """Only a docstring."""


def empty():
    ("Only a docstring, "
     "in parentheses.")  # and a comment


def one(): "doc"; return 1


def two(): "only doc";


def total(values):
    """The function's docstring."""
    return sum(
        v * 2  # doubled
        # a comment line inside brackets
        for v in values
    ) + math.floor(1.5)


TEXT = """not a docstring # kept

    """
if HASH:
    "a first string of an if: no docstring"
RESULT = (total([1, 2, 3]), empty(), one(), two(), Box.size, HASH, TAG, Marker.__name__, TEXT)
'''
# What strip_prose leaves of it, written out: the shebang, every string that is no docstring (f-string and the
# strings holding # included), the code lines unjoined, `...` for the bodies that held only a docstring.
PROSE_STRIPPED = '''#!/usr/bin/env python3
import math

HASH = "not # a comment"
TAG = f"#{len(HASH)} # {HASH!r}"


class Box:

    size = 3


class Marker:
    ...


def empty():
    ...


def one(): return 1


def two(): ...


def total(values):
    return sum(
        v * 2
        for v in values
    ) + math.floor(1.5)


TEXT = """not a docstring # kept

    """
if HASH:
    "a first string of an if: no docstring"
RESULT = (total([1, 2, 3]), empty(), one(), two(), Box.size, HASH, TAG, Marker.__name__, TEXT)
'''


def comments(source: str) -> list:
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]


def docstrings(source: str) -> list:
    return [pack.docstring_of(node) for node in ast.walk(ast.parse(source)) if pack.docstring_of(node) is not None]


def test_strip_prose_drops_comments_and_docstrings_and_keeps_every_other_string():
    stripped = pack.strip_prose(PROSE)
    assert stripped == PROSE_STRIPPED
    assert comments(stripped) == ["#!/usr/bin/env python3"] and docstrings(stripped) == []
    pack.same_program(PROSE, stripped)  # raises if not
    before, after = {}, {}
    exec(compile(PROSE, "prose", "exec"), before)
    exec(compile(stripped, "stripped", "exec"), after)
    assert after["RESULT"] == before["RESULT"] == (13, None, 1, None, 3, "not # a comment", "#15 # 'not # a comment'",
                                                   "Marker", 'not a docstring # kept\n\n    ')
    assert before["total"].__doc__ == "The function's docstring." and after["total"].__doc__ is None
    assert pack.strip_prose("x = 1  # no newline at the end") == "x = 1"
    # ast counts columns in bytes, tokenize in characters: a docstring after a non-ASCII name still lines up.
    assert pack.strip_prose('class \xc9: "d\xe9"; x = "\xe9"  # \xe7\n') == 'class \xc9: x = "\xe9"\n'


def test_strip_prose_on_train_gpt_is_the_same_program_in_fewer_packed_bytes():
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    stripped = pack.strip_prose(source)
    compile(stripped, "train_gpt.py", "exec")
    assert ast.dump(ast.parse(stripped)) == ast.dump(pack.without_docstrings(ast.parse(source)))
    assert comments(stripped) == [] and docstrings(stripped) == [] and comments(source) and docstrings(source)
    # No code line is joined or split: each stripped line is an original line, less its comment, in order.
    originals = iter(source.splitlines())
    for line in stripped.splitlines():
        assert any(original.startswith(line) and (original[len(line):].strip() == "" or
                                                  original[len(line):].lstrip().startswith("#"))
                   for original in originals), line
    packed, packed_exact = pack.pack(source.encode()), pack.pack(source.encode(), strip=False)
    print(f"train_gpt.py packed: {len(packed):,} bytes stripped, {len(packed_exact):,} with its prose")
    assert len(packed) < len(packed_exact)
    assert pack.unpack(packed) == stripped.encode() and pack.unpack(packed_exact) == source.encode()


def test_pack_refuses_a_stripped_text_that_is_another_program(monkeypatch):
    source = b'"""Doc."""\nx = 1  # one\ny = 2\n'
    assert pack.unpack(pack.pack(source)) == b"x = 1\ny = 2\n"
    monkeypatch.setattr(pack, "strip_prose", lambda text: text.replace("y = 2\n", ""))
    with pytest.raises(ValueError, match="changed the program"):
        pack.pack(source)
    monkeypatch.setattr(pack, "strip_prose", lambda text: text.replace("y = 2", "y = (2"))
    with pytest.raises(ValueError, match="does not parse"):
        pack.pack(source)
    assert pack.unpack(pack.pack(source, strip=False)) == source  # the exact source skips the check


def test_pack_cli_strips_by_default_and_keeps_the_prose_when_asked(tmp_path):
    source = tmp_path / "prog.py"
    source.write_text(PROSE, encoding="utf-8")
    script = [sys.executable, str(ROOT / "scripts" / "pack.py")]
    for flags, name, held in (([], "stripped.py", PROSE_STRIPPED), (["--keep-prose"], "exact.py", PROSE)):
        done = subprocess.run([*script, *flags, str(source), str(tmp_path / name)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        unpacked = subprocess.run([*script, "--unpack", str(tmp_path / name)], capture_output=True, timeout=60)
        assert unpacked.returncode == 0 and unpacked.stdout == held.encode(), unpacked.stderr
    assert (tmp_path / "stripped.py").stat().st_size < (tmp_path / "exact.py").stat().st_size


def test_real_record_folders():
    folders = sorted(p for p in ROOT.glob("records/*/*") if p.is_dir() and "__pycache__" not in p.parts)
    if not folders:
        pytest.skip("no record folders records/<track>/<name>/ yet")
    with_submission = [f for f in folders if (f / "submission.json").is_file()]
    assert with_submission, f"record folders without any submission.json: {[str(f) for f in folders]}"
    problems = [p for f in with_submission for p in record_folder_problems(f)]
    assert not problems, "\n".join(problems)
