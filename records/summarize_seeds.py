"""Summarize a folder of train_gpt.py runs (one per seed) into results.md and submission.json, claiming nothing
the runs' own files do not show.

A run is a pair FOLDER/<stem>.txt (the log train_gpt.py writes: its own source, a line of 100 '=', then log
lines) and FOLDER/<stem>.json (the run facts). For each run the LAST `<tag>_exact val_loss:X val_bpb:Y` line of
the log must agree with the json's val_loss/val_bpb to 1e-8. The summary gives per-seed rows, mean and sample
standard deviation, and the challenge's record test: a one-sided one-sample t-test of
    H0: mean val_loss >= reference_loss - margin   against   H1: mean val_loss < reference_loss - margin,
    t = (reference_loss - margin - mean) / (std / sqrt(n)),  p = 1 - F_t(t; n - 1).
Every number written comes from the run files. Standard library only.

What it will not do:
- modify a file: if the folder (or --output-dir) already holds submission.json or results.md it stops and says so;
  --output-dir DIR writes both files into DIR instead (made if missing; it must hold neither file).
- write a record submission (track "10min_16mb") from fewer than three seeds, from a run whose facts do not say
  `valid: true`, with a compliance flag that is not true, or without p < 0.01. It stops with the reasons; with
  --non-record it writes a "non_record_16mb" submission whose results.md says first that it is not a record
  submission, and why.
- read a flag a run does not state as false or as true: it is null in submission.json, "not stated" in results.md.
  The records' flags no_slot, no_etlb, no_ngram_cache, no_pre_quant_ttt, score_first_ttt and three_seeds are
  computed from the logs' `*_exact` passes and the facts, never assumed.

Usage: python3 records/summarize_seeds.py FOLDER --reference-loss X [--margin 0.005] [--output-dir DIR]
           [--non-record] [--name ... --author ... --github-id ... --blurb ...]
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
TRACK_RECORD, TRACK_NON_RECORD = "10min_16mb", "non_record_16mb"  # the names the official records write
OUTPUTS = ("submission.json", "results.md")
# The rules train_gpt.py checks against what each run measured (its facts json, "compliance"): true, false, or
# null (not assessed). full_validation_split is the older facts' name for "VAL_MAX_TOKENS=0", which says nothing
# about which data the split came from, so it is carried under its own name and never as official_validation_split.
FLAGS = ("wallclock_cap_set", "train_under_600s", "calibration_within_wallclock", "no_val_data_in_training",
         "official_validation_split", "full_validation_split", "eight_h100", "eval_under_600s",
         "artifact_under_16mb", "score_first", "finite_score")
# The evaluation passes train_gpt.py runs: a log tag final_<artifact>_<pass>. A pass outside this list could be
# anything (a SLOT delta, a logit bias, an n-gram cache), so a run that logged one claims none of those flags.
PLAIN_PASS_RE = re.compile(r"^final_\w+?_(roundtrip|sliding_window|doc_isolated|ttt)$")
# What a record must show as true, besides three seeds, `valid: true` for every run and p < 0.01.
RECORD_FLAGS = ("train_under_600s", "artifact_under_16mb", "eval_under_600s", "no_slot", "no_pre_quant_ttt",
                "no_etlb", "no_ngram_cache") + tuple(f for f in FLAGS if f not in (
                    "train_under_600s", "artifact_under_16mb", "eval_under_600s", "full_validation_split"))


class RecordError(Exception):
    """A run folder that cannot be summarized (missing or inconsistent files), or a summary that may not be
    written (it would overwrite a file, or claim a record the runs do not support)."""


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


def exact_lines(log_text: str) -> list:
    """(tag, val_loss, val_bpb) of every `*_exact` line after the source-code header, in order."""
    return [(tag, float(loss), float(bpb)) for tag, loss, bpb in EXACT_RE.findall(log_body(log_text))]


def last_exact(log_text: str):
    """(tag, val_loss, val_bpb) of the last `*_exact` line after the source-code header, or None."""
    hits = exact_lines(log_text)
    return hits[-1] if hits else None


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
        exact = exact_lines(text)
        if not exact:
            raise RecordError(f"{logs[stem]}: no `*_exact val_loss:... val_bpb:...` line")
        tag, loss, bpb = exact[-1]
        if not (abs(loss - facts["val_loss"]) <= TOL and abs(bpb - facts["val_bpb"]) <= TOL):  # NaN fails too
            raise RecordError(f"{logs[stem]}: last line {tag}_exact gives val_loss {loss} val_bpb {bpb}, but "
                              f"{jsons[stem].name} says {facts['val_loss']} / {facts['val_bpb']}")
        logged_seed = SEED_RE.findall(log_body(text))
        if logged_seed and int(logged_seed[-1]) != facts["seed"]:
            raise RecordError(f"{logs[stem]}: logs SEED {logged_seed[-1]}, {jsons[stem].name} says {facts['seed']}")
        if facts["seed"] in seeds:
            raise RecordError(f"{jsons[stem]}: seed {facts['seed']} already used by {seeds[facts['seed']]}")
        seeds[facts["seed"]] = jsons[stem].name
        if facts.get("valid") is not True:
            warn(f"{jsons[stem].name}: valid is {facts.get('valid')!r}")
        if facts.get("config", {}).get("VAL_MAX_TOKENS", "0") not in ("0", ""):
            warn(f"{jsons[stem].name}: VAL_MAX_TOKENS={facts['config']['VAL_MAX_TOKENS']}: scores a prefix of "
                 "the validation split, not an official score")
        code = folder / "train_gpt.py"  # a record is rerun from this file, so it must be what made the logs
        if code.is_file() and log_source(text).encode("utf-8") != code.read_bytes():
            raise RecordError(f"{logs[stem]}: the source at the top of the log differs from {code}: put the "
                              f"script that produced the logs in the folder")
        runs.append({"stem": stem, "facts": facts, "tag": tag, "tags": [t for t, _, _ in exact]})
    if not runs:
        raise RecordError(f"{folder}: no run (a <stem>.json with its <stem>.txt log)")
    return sorted(runs, key=lambda r: r["facts"]["seed"])


def agreed(runs: list, key: str, warn):
    """The value every run's facts give for key; if they differ, all values joined, with a warning."""
    values = sorted({str(r["facts"].get(key)) for r in runs})
    if len(values) > 1:
        warn(f"runs disagree on {key}: {values}")
    return runs[0]["facts"].get(key) if len(values) == 1 else " / ".join(values)


# ---- Compliance: true, false or None ("not stated"), never filled in for a run that does not say.

def all_true(values) -> bool | None:
    """AND over runs that keeps "not stated" apart: False if any run says false, True if every run says true,
    else None. Anything but a bool counts as not stated."""
    values = list(values)
    if any(v is False for v in values):
        return False
    return True if values and all(v is True for v in values) else None


def run_claims(run: dict) -> dict:
    """The records' evaluation flags for one run, from the `*_exact` passes its log shows and its facts."""
    results = run["facts"].get("results")
    ttt = results.get("ttt") if isinstance(results, dict) else None
    ttt = ttt if isinstance(ttt, dict) else None
    passes = [m.group(1) if (m := PLAIN_PASS_RE.match(tag)) else None for tag in run["tags"]]
    ran_ttt = ttt is not None or "ttt" in passes
    score_first = (ttt or {}).get("score_first")
    score_first = score_first if isinstance(score_first, bool) else None
    plain = None not in passes and (not ran_ttt or score_first is True)
    if ran_ttt:  # the facts say what the TTT pass adapted; older facts do not
        on = (ttt or {}).get("on")
        pre_quant = None if on is None else on == "dequantized artifact"
    else:
        pre_quant = True if plain else None
    return {"ran_ttt": ran_ttt, "score_first_ttt": score_first if ran_ttt else None, "plain": plain,
            "no_pre_quant_ttt": pre_quant, "passes": sorted({p or "?" for p in passes})}


def compliance_of(runs: list, warn) -> dict:
    """The submission's compliance object: the records' keys first, then the rules each run's facts state."""
    claims = [run_claims(r) for r in runs]
    stated = [r["facts"].get("compliance") if isinstance(r["facts"].get("compliance"), dict) else {} for r in runs]
    plain = all_true(c["plain"] or None for c in claims)  # a run with an unknown pass states nothing here
    ttt_runs = [c for c in claims if c["ran_ttt"]]
    out = {flag: all_true(s.get(flag) for s in stated)
           for flag in ("train_under_600s", "artifact_under_16mb", "eval_under_600s")}
    out.update(no_slot=plain, no_pre_quant_ttt=all_true(c["no_pre_quant_ttt"] for c in claims),
               no_etlb=plain, no_ngram_cache=plain,
               score_first_ttt=all_true(c["score_first_ttt"] for c in ttt_runs) if ttt_runs else None,
               three_seeds=len({r["facts"]["seed"] for r in runs}) >= 3, no_ttt=not ttt_runs)
    out.update({flag: all_true(s.get(flag) for s in stated) for flag in FLAGS if flag not in out})
    for key in ("valid", "valid_except_hardware_and_data"):
        out[key] = all_true(r["facts"].get(key) for r in runs)
    for key in ("calibration", "test_time_adaptation"):  # descriptions: carried only when every run gives the same
        texts = {s.get(key) for s in stated}
        if len(texts) == 1 and isinstance(next(iter(texts)), str):
            out[key] = texts.pop()
        elif texts != {None}:
            warn(f"runs disagree on compliance.{key}: {sorted(map(str, texts))}: left out")
    return out


def record_blockers(runs: list, compliance: dict, test: dict) -> list:
    """Why these runs are not a record submission (empty: they may be one)."""
    seeds = sorted({r["facts"]["seed"] for r in runs})
    reasons = [] if len(seeds) >= 3 else [f"a record needs 3 seeds or more, these runs have {len(seeds)} {seeds}"]
    for r in runs:
        f = r["facts"]
        if f.get("valid") is not True:
            broken = f.get("broken_rules") if isinstance(f.get("broken_rules"), list) else []
            reasons.append(f"seed {f['seed']} ({r['stem']}): its facts say valid: {json.dumps(f.get('valid'))}"
                           + (f" ({'; '.join(map(str, broken))})" if broken else ""))
    for flag in RECORD_FLAGS:
        if compliance.get(flag) is not True:
            reasons.append(f"compliance {flag}: {describe(compliance.get(flag))}")
    if compliance["score_first_ttt"] is False or (not compliance["no_ttt"] and compliance["score_first_ttt"] is None):
        reasons.append(f"compliance score_first_ttt: {describe(compliance['score_first_ttt'])}")
    if test["p"] is None or not test["p"] < 0.01:
        reasons.append(f"the t-test against reference {test['reference_loss']} - margin {test['margin']} does not "
                       f"give p < 0.01 (p = {'not computable' if test['p'] is None else format(test['p'], '.3g')})")
    return reasons


def describe(value) -> str:
    return "not stated" if value is None else str(value)


# ---- The summary.

def summarize(folder, reference_loss: float, margin: float = 0.005, meta=None, warn=None, output_dir=None,
              non_record: bool = False) -> dict:
    """Write results.md and submission.json into output_dir (default: folder), neither of which may exist;
    return the submission dict. A record submission unless the runs do not support one: then RecordError,
    or, with non_record, a non_record_16mb submission that says why."""
    folder, meta = Path(folder), dict(meta or {})
    target = Path(output_dir) if output_dir is not None else folder
    warn = warn or (lambda msg: print(f"WARNING: {msg}", file=sys.stderr))
    runs = load_runs(folder, warn)
    existing = [target / name for name in OUTPUTS if (target / name).exists()]
    if existing:
        verb = "exists" if len(existing) == 1 else "exist"
        raise RecordError(f"{' and '.join(map(str, existing))} {verb}: summarize_seeds.py never modifies a file "
                          f"that is there; pass --output-dir DIR (a folder holding neither {' nor '.join(OUTPUTS)}) to "
                          f"write the summary elsewhere")
    facts = [r["facts"] for r in runs]
    losses, bpbs = [f["val_loss"] for f in facts], [f["val_bpb"] for f in facts]
    n = len(runs)
    loss_std = statistics.stdev(losses) if n > 1 else None
    bpb_std = statistics.stdev(bpbs) if n > 1 else None
    test = t_test(losses, reference_loss, margin)
    note = test.pop("note")
    compliance = compliance_of(runs, warn)
    blockers = record_blockers(runs, compliance, test)
    if blockers and not non_record:
        raise RecordError("not a record submission: " + "; ".join(blockers) + ". Pass --non-record to write a "
                          f"{TRACK_NON_RECORD} submission that says so")
    if non_record and not blockers:
        blockers = ["written with --non-record"]
    if len({f.get("bytes_code") for f in facts}) > 1:
        warn("runs disagree on bytes_code (different code?): the largest is reported")
    missing = [k for k in ("author", "github_id", "blurb") if not meta.get(k)]
    if missing:
        warn(f"submission.json will hold null for {', '.join(missing)}: pass "
             + " ".join(f"--{k.replace('_', '-')} ..." for k in missing))
    track = TRACK_NON_RECORD if non_record else TRACK_RECORD
    if folder.resolve().parent.name.startswith("track_") and folder.resolve().parent.name != f"track_{track}":
        warn(f"a {track} submission in {folder.resolve().parent.name}/: the records keep it in track_{track}/")

    def mean_if_all(key: str):
        values = [f.get(key) for f in facts]
        return statistics.fmean(values) if all(isinstance(v, (int, float)) for v in values) else None

    submission = {
        "author": meta.get("author"), "github_id": meta.get("github_id"), "name": meta.get("name") or folder.name,
        "blurb": meta.get("blurb"), "date": datetime.date.today().isoformat(),
        "track": track,
        "val_loss": statistics.fmean(losses), "val_bpb": statistics.fmean(bpbs),
        "val_loss_std": loss_std, "val_bpb_std": bpb_std,
        "pre_quant_val_loss": mean_if_all("pre_quant_val_loss"), "pre_quant_val_bpb": mean_if_all("pre_quant_val_bpb"),
        "bytes_total": max(f["bytes_total"] for f in facts), "bytes_code": max(f["bytes_code"] for f in facts),
        "seeds": [f["seed"] for f in facts],
        "seed_results": {str(f["seed"]): {"val_loss": f["val_loss"], "val_bpb": f["val_bpb"],
                                          "artifact_bytes": f["bytes_total"], "steps": f.get("steps"),
                                          "step_avg_ms": f.get("step_avg_ms"),
                                          "eval_time_s": f.get("eval_time_seconds"),
                                          "valid": f.get("valid")} for f in facts},
        "hardware": agreed(runs, "hardware", warn), "pytorch_version": agreed(runs, "pytorch_version", warn),
        "t_test": test, "compliance": compliance,
    }
    if non_record:
        submission["not_a_record_because"] = blockers

    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = [f"# {submission['name']}", ""]
    if non_record:
        lines += [f"**This is not a record submission** (track `{TRACK_NON_RECORD}`): " + "; ".join(blockers) + ".",
                  ""]
    lines += [f"Runs in `{folder.name}/`: {n}. Headline metric of each run: the last `*_exact` line of its log "
              f"({', '.join(sorted({r['tag'] for r in runs}))}).", "",
              "| seed | steps | step_avg_ms | val_loss | val_bpb | bytes_total | train+calibration s | eval s "
              "| valid |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for f in facts:
        lines.append(f"| {f['seed']} | {f.get('steps', 'n/a')} | {fmt(f.get('step_avg_ms'), '.2f')} | "
                     f"{f['val_loss']:.8f} | {f['val_bpb']:.8f} | {f['bytes_total']} | "
                     f"{fmt(f.get('train_plus_calibration_s'), '.1f')} | {fmt(f.get('eval_time_seconds'), '.1f')} | "
                     f"{describe(f.get('valid'))} |")
    lines += ["", f"- val_loss: {submission['val_loss']:.8f} ± {fmt(loss_std, '.8f')} (mean ± sample std, n={n})",
              f"- val_bpb: {submission['val_bpb']:.8f} ± {fmt(bpb_std, '.8f')} (mean ± sample std, n={n})"]
    head = (f"- one-sided t-test, H0: mean val_loss >= {reference_loss} - {margin} (reference - margin): n={n}, ")
    if test["p"] is None:
        lines.append(head + note)
    else:
        verdict = "yes" if test["p"] < 0.01 else "no"
        lines.append(head + f"t={test['t']:.4f}, df={test['df']}, p={test['p']:.3g}; p < 0.01: {verdict}")
    lines += [f"- bytes_total (max over seeds): {submission['bytes_total']}", "",
              "## Compliance", "",
              "From the runs' facts and logs, over all seeds: False if any run says false, True if every run says "
              "true, otherwise not stated (a run does not state it; never read as true or false).", ""]
    derived = {"no_slot": "every `*_exact` pass in the logs is one of train_gpt.py's plain passes",
               "no_etlb": "as no_slot", "no_ngram_cache": "as no_slot",
               "no_pre_quant_ttt": "every TTT pass evaluated the dequantized artifact; with no TTT pass, every "
                                   "pass is plain",
               "score_first_ttt": "each TTT pass's facts, score_first; not stated when no TTT ran",
               "three_seeds": "distinct seeds", "no_ttt": "no run logged a TTT pass"}
    passes = sorted({p for r in runs for p in run_claims(r)["passes"]})
    for key, value in compliance.items():
        why = f" ({derived[key]})" if key in derived else ""
        lines.append(f"- {key}: {value if isinstance(value, str) else describe(value)}{why}")
    lines.append(f"- passes the logs show: {', '.join(passes)}" + (" (?: a pass train_gpt.py does not run)"
                                                                 if "?" in passes else ""))
    target.mkdir(parents=True, exist_ok=True)
    # "x": fail rather than overwrite, even if a file appeared since the check above
    with open(target / "submission.json", "x", encoding="utf-8") as out:
        out.write(json.dumps(submission, indent=2) + "\n")
    with open(target / "results.md", "x", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    return submission


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--reference-loss", type=float, required=True, help="val_loss (nats) of the record to beat")
    ap.add_argument("--margin", type=float, default=0.005, help="required improvement in nats (default 0.005)")
    ap.add_argument("--output-dir", type=Path, help="write results.md and submission.json here instead of FOLDER "
                                                    "(it must hold neither)")
    ap.add_argument("--non-record", action="store_true",
                    help=f"write a {TRACK_NON_RECORD} submission, saying why it is not a record")
    for opt in ("name", "author", "github-id", "blurb"):
        ap.add_argument(f"--{opt}")
    args = ap.parse_args(argv)
    meta = {k: getattr(args, k) for k in ("name", "author", "github_id", "blurb")}
    try:
        sub = summarize(args.folder, args.reference_loss, args.margin, meta, output_dir=args.output_dir,
                        non_record=args.non_record)
    except RecordError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    target = args.output_dir if args.output_dir is not None else args.folder
    p = sub["t_test"]["p"]
    print(f"{len(sub['seeds'])} seeds {sub['seeds']}: val_loss {sub['val_loss']:.8f} val_bpb {sub['val_bpb']:.8f}; "
          f"p = {'n/a' if p is None else format(p, '.3g')}; track {sub['track']}; wrote {target / 'results.md'} and "
          f"{target / 'submission.json'}" + ("" if args.output_dir is None else f" (nothing in {args.folder})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
