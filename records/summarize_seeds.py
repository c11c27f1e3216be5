"""Summarize a folder of train_gpt.py runs (one per seed) into results.md and submission.json.

A run is a pair FOLDER/<stem>.txt (the log train_gpt.py writes: its own source, a line of 100 '=', then log
lines) and FOLDER/<stem>.json (the run facts). For each run the LAST `<tag>_exact val_loss:X val_bpb:Y` line of
the log must agree with the json's val_loss/val_bpb to 1e-8. The summary gives per-seed rows, mean and sample
standard deviation, and the challenge's record test: a one-sided one-sample t-test of
    H0: mean val_loss >= reference_loss - margin   against   H1: mean val_loss < reference_loss - margin,
    t = (reference_loss - margin - mean) / (std / sqrt(n)),  p = 1 - F_t(t; n - 1).
Every number written comes from the run files. Standard library only.

Usage: python3 records/summarize_seeds.py FOLDER --reference-loss X [--margin 0.005]
           [--name ... --author ... --github-id ... --blurb ... --track ...]
"""
import argparse
import datetime
import json
import math
import re
import statistics
import sys
from pathlib import Path

SEPARATOR = "=" * 100
NUM = r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?"
EXACT_RE = re.compile(rf"^(\w+)_exact val_loss:({NUM}) val_bpb:({NUM})[ \t]*$", re.M)
SEED_RE = re.compile(r"^  SEED: (\d+)[ \t]*$", re.M)
TOL = 1e-8
REQUIRED = ("seed", "val_loss", "val_bpb", "bytes_total", "bytes_code")
# The rules train_gpt.py checks against what each run measured (its facts json, "compliance").
FLAGS = ("wallclock_cap_set", "train_under_600s", "calibration_within_wallclock", "no_val_data_in_training",
         "full_validation_split", "eval_under_600s", "artifact_under_16mb", "score_first")


class RecordError(Exception):
    """A run folder that cannot be summarized (missing or inconsistent files)."""


# ---- Student t distribution. I_x(a, b) by its continued fraction (DLMF 8.17.22; Abramowitz & Stegun 26.5.8),
# ---- evaluated with the modified Lentz method (Thompson & Barnett 1986); F_t from I_x via A&S 26.7.1.

def _lentz(coefficient, eps=1e-15, max_terms=1000):
    """Value of 1 + d1/(1 + d2/(1 + d3/(1 + ...))), where d_j = coefficient(j)."""
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for j in range(1, max_terms + 1):
        dj = coefficient(j)
        d = 1.0 + dj * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + dj / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(c * d - 1.0) < eps:
            return f
    raise ArithmeticError("continued fraction did not converge")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point: use symmetry
        return 1.0 - betainc(b, a, 1.0 - x)

    def d(j: int) -> float:
        m = j // 2
        if j % 2 == 0:
            return m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        return -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))

    log_front = a * math.log(x) + b * math.log1p(-x) + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return math.exp(log_front) / (a * _lentz(d))


def t_cdf(t: float, df: float) -> float:
    """F_t(t; df), the Student t CDF: P(T > |t|) = I_{df/(df+t^2)}(df/2, 1/2) / 2."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_test(losses: list, reference_loss: float, margin: float) -> dict:
    """One-sided one-sample t-test that the mean loss improves on reference_loss by more than margin."""
    n = len(losses)
    out = {"reference_loss": reference_loss, "margin": margin, "n": n, "t": None, "df": None, "p": None,
           "note": None}
    if n < 2:
        out["note"] = "not computable (needs at least 2 seeds)"
        return out
    std = statistics.stdev(losses)
    if std == 0.0:
        out["note"] = "not computable (every seed has the same val_loss: zero spread)"
        return out
    t = (reference_loss - margin - statistics.fmean(losses)) / (std / math.sqrt(n))
    out.update(t=t, df=n - 1, p=t_cdf(-t, n - 1))  # 1 - F(t) = F(-t), without cancellation
    return out


# ---- Run files.

def log_body(log_text: str) -> str:
    """What the run logged: the text after the archived source and its separator line."""
    return log_text.rsplit("\n" + SEPARATOR + "\n", 1)[-1]


def log_source(log_text: str) -> str:
    """The source the run archived at the top of its log (everything before the separator line)."""
    return log_text.split("\n" + SEPARATOR + "\n", 1)[0]


def last_exact(log_text: str):
    """(tag, val_loss, val_bpb) of the last `*_exact` line after the source-code header, or None."""
    hits = EXACT_RE.findall(log_body(log_text))
    return (hits[-1][0], float(hits[-1][1]), float(hits[-1][2])) if hits else None


def load_runs(folder: Path, warn) -> list:
    """Every run (facts json + log txt) in folder, checked; files without a partner are reported and skipped."""
    jsons = {p.stem: p for p in folder.glob("*.json") if p.name != "submission.json"}
    # A log is a .txt holding the separator line train_gpt.py writes; other text files (requirements.txt) are not.
    logs = {p.stem: p for p in folder.glob("*.txt") if SEPARATOR in p.read_text(encoding="utf-8", errors="replace")}
    for stem in sorted(set(jsons) - set(logs)):
        warn(f"{jsons[stem].name}: run facts without a log {stem}.txt: skipped (its score cannot be checked)")
    for stem in sorted(set(logs) - set(jsons)):
        warn(f"{logs[stem].name}: log without run facts {stem}.json (crashed run?): skipped")
    runs, seeds = [], {}
    for stem in sorted(set(jsons) & set(logs)):
        try:
            facts = json.loads(jsons[stem].read_text(encoding="utf-8"))
        except ValueError as err:
            raise RecordError(f"{jsons[stem]}: not JSON: {err}") from err
        missing = [k for k in REQUIRED if k not in facts] if isinstance(facts, dict) else list(REQUIRED)
        if missing:
            raise RecordError(f"{jsons[stem]}: no {', '.join(missing)}: not the facts of a finished training run")
        text = logs[stem].read_text(encoding="utf-8")
        exact = last_exact(text)
        if exact is None:
            raise RecordError(f"{logs[stem]}: no `*_exact val_loss:... val_bpb:...` line")
        tag, loss, bpb = exact
        if not (abs(loss - facts["val_loss"]) <= TOL and abs(bpb - facts["val_bpb"]) <= TOL):  # NaN fails too
            raise RecordError(f"{logs[stem]}: last line {tag}_exact gives val_loss {loss} val_bpb {bpb}, but "
                              f"{jsons[stem].name} says {facts['val_loss']} / {facts['val_bpb']}")
        logged_seed = SEED_RE.findall(log_body(text))
        if logged_seed and int(logged_seed[-1]) != facts["seed"]:
            raise RecordError(f"{logs[stem]}: logs SEED {logged_seed[-1]}, {jsons[stem].name} says {facts['seed']}")
        if facts["seed"] in seeds:
            raise RecordError(f"{jsons[stem]}: seed {facts['seed']} already used by {seeds[facts['seed']]}")
        seeds[facts["seed"]] = jsons[stem].name
        if not facts.get("valid", False):
            warn(f"{jsons[stem].name}: valid is {facts.get('valid')!r}")
        if facts.get("config", {}).get("VAL_MAX_TOKENS", "0") not in ("0", ""):
            warn(f"{jsons[stem].name}: VAL_MAX_TOKENS={facts['config']['VAL_MAX_TOKENS']}: scores a prefix of "
                 "the validation split, not an official score")
        code = folder / "train_gpt.py"  # a record is rerun from this file, so it must be what made the logs
        if code.is_file() and log_source(text).encode("utf-8") != code.read_bytes():
            raise RecordError(f"{logs[stem]}: the source at the top of the log differs from {code}: put the "
                              f"script that produced the logs in the folder")
        runs.append({"stem": stem, "facts": facts, "tag": tag})
    if not runs:
        raise RecordError(f"{folder}: no run (a <stem>.json with its <stem>.txt log)")
    return sorted(runs, key=lambda r: r["facts"]["seed"])


def agreed(runs: list, key: str, warn):
    """The value every run's facts give for key; if they differ, all values joined, with a warning."""
    values = sorted({str(r["facts"].get(key)) for r in runs})
    if len(values) > 1:
        warn(f"runs disagree on {key}: {values}")
    return runs[0]["facts"].get(key) if len(values) == 1 else " / ".join(values)


def summarize(folder, reference_loss: float, margin: float = 0.005, meta=None, warn=None) -> dict:
    """Write folder/results.md and folder/submission.json; return the submission dict."""
    folder, meta = Path(folder), dict(meta or {})
    warn = warn or (lambda msg: print(f"WARNING: {msg}", file=sys.stderr))
    runs = load_runs(folder, warn)
    facts = [r["facts"] for r in runs]
    losses, bpbs = [f["val_loss"] for f in facts], [f["val_bpb"] for f in facts]
    n = len(runs)
    loss_std = statistics.stdev(losses) if n > 1 else None
    bpb_std = statistics.stdev(bpbs) if n > 1 else None
    test = t_test(losses, reference_loss, margin)
    note = test.pop("note")
    compliance = {flag: all(f.get("compliance", {}).get(flag) is True for f in facts) for flag in FLAGS}
    calibrations = {f.get("compliance", {}).get("calibration") for f in facts}
    if len(calibrations) == 1 and None not in calibrations:
        compliance["calibration"] = calibrations.pop()
    else:
        warn(f"runs disagree on compliance.calibration: {sorted(map(str, calibrations))}: left out")
    if len({f.get("bytes_code") for f in facts}) > 1:
        warn("runs disagree on bytes_code (different code?): the largest is reported")
    track = folder.parent.name if folder.parent.name.startswith("track_") else None
    submission = {
        "author": meta.get("author"), "github_id": meta.get("github_id"), "name": meta.get("name") or folder.name,
        "blurb": meta.get("blurb"), "date": datetime.date.today().isoformat(), "track": meta.get("track") or track,
        "val_loss": statistics.fmean(losses), "val_bpb": statistics.fmean(bpbs),
        "val_loss_std": loss_std, "val_bpb_std": bpb_std,
        "bytes_total": max(f["bytes_total"] for f in facts), "bytes_code": max(f["bytes_code"] for f in facts),
        "seeds": [f["seed"] for f in facts],
        "seed_results": {str(f["seed"]): {"val_loss": f["val_loss"], "val_bpb": f["val_bpb"],
                                          "artifact_bytes": f["bytes_total"], "steps": f.get("steps"),
                                          "step_avg_ms": f.get("step_avg_ms"),
                                          "eval_time_s": f.get("eval_time_seconds")} for f in facts},
        "hardware": agreed(runs, "hardware", warn), "pytorch_version": agreed(runs, "pytorch_version", warn),
        "t_test": test, "compliance": compliance,
    }
    (folder / "submission.json").write_text(json.dumps(submission, indent=2) + "\n", encoding="utf-8")

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = [f"# {submission['name']}", "", f"Runs in `{folder.name}/`: {n}. Headline metric of each run: the last "
             f"`*_exact` line of its log ({', '.join(sorted({r['tag'] for r in runs}))}).", "",
             "| seed | steps | step_avg_ms | val_loss | val_bpb | bytes_total | train+calibration s | eval s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in facts:
        lines.append(f"| {f['seed']} | {f.get('steps', 'n/a')} | {fmt(f.get('step_avg_ms'), '.2f')} | "
                     f"{f['val_loss']:.8f} | {f['val_bpb']:.8f} | {f['bytes_total']} | "
                     f"{fmt(f.get('train_plus_calibration_s'), '.1f')} | {fmt(f.get('eval_time_seconds'), '.1f')} |")
    lines += ["", f"- val_loss: {submission['val_loss']:.8f} ± {fmt(loss_std, '.8f')} (mean ± sample std, n={n})",
              f"- val_bpb: {submission['val_bpb']:.8f} ± {fmt(bpb_std, '.8f')} (mean ± sample std, n={n})"]
    head = (f"- one-sided t-test, H0: mean val_loss >= {reference_loss} - {margin} (reference - margin): n={n}, ")
    if test["p"] is None:
        lines.append(head + note)
    else:
        verdict = "yes" if test["p"] < 0.01 else "no"
        lines.append(head + f"t={test['t']:.4f}, df={test['df']}, p={test['p']:.3g}; p < 0.01: {verdict}")
    lines += [f"- bytes_total (max over seeds): {submission['bytes_total']}",
              "- compliance (AND over seeds): " + ", ".join(f"{k}={compliance[k]}" for k in FLAGS)]
    (folder / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return submission


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--reference-loss", type=float, required=True, help="val_loss (nats) of the record to beat")
    ap.add_argument("--margin", type=float, default=0.005, help="required improvement in nats (default 0.005)")
    for opt in ("name", "author", "github-id", "blurb", "track"):
        ap.add_argument(f"--{opt}")
    args = ap.parse_args(argv)
    meta = {k: getattr(args, k) for k in ("name", "author", "github_id", "blurb", "track")}
    try:
        sub = summarize(args.folder, args.reference_loss, args.margin, meta)
    except RecordError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    p = sub["t_test"]["p"]
    print(f"{len(sub['seeds'])} seeds {sub['seeds']}: val_loss {sub['val_loss']:.8f} val_bpb {sub['val_bpb']:.8f}; "
          f"p = {'n/a' if p is None else format(p, '.3g')}; wrote {args.folder / 'results.md'} and "
          f"{args.folder / 'submission.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
