"""Tests of scripts/compare.py on small synthetic run logs written in tmp dirs, and of the index it generates
for logs/README.md from the committed logs."""
import hashlib
import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT as ROOT

_spec = importlib.util.spec_from_file_location("compare", ROOT / "scripts" / "compare.py")
cmp = importlib.util.module_from_spec(_spec)
sys.modules["compare"] = cmp  # dataclasses look their module up there
_spec.loader.exec_module(cmp)

SOURCE = '"""a stand-in for train_gpt.py"""\nprint("hello")\n'
P360 = {"MAX_WALLCLOCK_SECONDS": "360.0", "TRAIN_BATCH_TOKENS": "786432", "ITERATIONS": "20000"}
P150 = {"MAX_WALLCLOCK_SECONDS": "150.0", "TRAIN_BATCH_TOKENS": "131072", "ITERATIONS": "20000"}
BASE = {"DATA_PATH": "/tmp/sp8192", "TOKENIZER_PATH": "/tmp/sp8192/fineweb_8192_bpe.model", "VOCAB_SIZE": "8192",
        "VAL_MAX_TOKENS": "0", "QKV_CONV_SIZE": "0", "SSM_LAYERS": "0,1", **P360}


def write_run(folder: Path, name: str, seed: int, sliding: float, *, knobs: dict | None = None,
              status: str = "evaluated", hardware: str = "1x NVIDIA H200", steps: int = 500, step_ms: float = 700.0,
              source: str = SOURCE, facts_extra: dict | None = None, loader_tokens: int | None = None,
              write_facts: bool = True) -> None:
    """A run as train_gpt.py writes it: <name>.txt (source, separator, log lines) and <name>.json (facts).
    status "started" stops the log in the middle of training; "failed" ends it with an ERROR line."""
    config = dict(BASE, RUN_ID=name, SEED=str(seed), ARTIFACT_PATH=f"/tmp/{name}.ptz", **(knobs or {}))
    batch = int(config["TRAIN_BATCH_TOKENS"])
    lines = [source.rstrip("\n"), cmp.ss.SEPARATOR, "hyperparameters:"] + [f"  {k}: {v}" for k, v in config.items()]
    lines.append(f"train_loader:dataset:{config['DATA_PATH']} train_shards:3"
                 + (f" tokens:{loader_tokens}" if loader_tokens else ""))
    for step in (1, 2, 100, 200, 300, 400, steps):
        lines.append(f"step:{step}/20000 train_loss:{9 - step / 100 - sliding:.4f} train_time:{step * step_ms:.0f}ms "
                     f"step_avg:{step_ms:.2f}ms")
        if status == "started" and step == 200:
            break
    facts = {"run_id": name, "status": status, "seed": seed, "world_size": 1}
    if status == "failed":
        lines.append("ERROR: RuntimeError: CUDA out of memory")
        facts["error"] = "RuntimeError: CUDA out of memory"
    elif status == "evaluated":
        roundtrip, pre = sliding + 0.016, sliding + 0.013
        lines += [f"train_summary steps:{steps} train_time:{steps * step_ms:.0f}ms step_avg:{step_ms:.2f}ms "
                  f"tokens_per_s:{batch / step_ms * 1000:.0f}",
                  f"pre_export val_loss:{pre * 2.5:.4f} val_bpb:{pre:.4f} weights:ema eval_time:17000ms",
                  "Total submission size mixed+lzma: 15990000 bytes", "export_time:14.0s (GPTQ ...)",
                  f"final_mixed_roundtrip val_loss:{roundtrip * 2.5:.4f} val_bpb:{roundtrip:.4f} eval_time:800ms",
                  f"final_mixed_roundtrip_exact val_loss:{roundtrip * 2.5:.8f} val_bpb:{roundtrip:.8f}",
                  f"final_mixed_sliding_window val_loss:{sliding * 2.5:.4f} val_bpb:{sliding:.4f} eval_time:25000ms",
                  f"final_mixed_sliding_window_exact val_loss:{sliding * 2.5:.8f} val_bpb:{sliding:.8f}",
                  f"submission_facts:logs/{name}.json valid:True"]
        facts.update(steps=steps, step_avg_ms=step_ms, train_time_ms=steps * step_ms,
                     tokens_per_s=batch / step_ms * 1000, pre_quant_val_loss=pre * 2.5, pre_quant_val_bpb=pre,
                     export_seconds=14.0, bytes_total=15990000, val_loss=sliding * 2.5, val_bpb=sliding,
                     results={"roundtrip": {"val_loss": roundtrip * 2.5, "val_bpb": roundtrip, "eval_seconds": 0.8},
                              "sliding_window": {"val_loss": sliding * 2.5, "val_bpb": sliding, "eval_seconds": 25.0}},
                     eval_time_seconds=25.8, valid=True, hardware=hardware, config=config)
    elif status == "exported":
        facts.update(export_seconds=14.0, bytes_total=15990000)
    facts.update(facts_extra or {})
    (folder / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if write_facts:
        (folder / f"{name}.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")


def ablation(folder: Path) -> dict:
    """Default runs and QKV_CONV_SIZE=2 at seeds 1, 2, 3; SSM_LAYERS='' at seed 1."""
    scores = {("d", 1): 1.2310, ("d", 2): 1.2290, ("d", 3): 1.2300, ("c", 1): 1.2270, ("c", 2): 1.2260,
              ("c", 3): 1.2281, ("a", 1): 1.2600}
    for (kind, seed), score in scores.items():
        knobs = {"c": {"QKV_CONV_SIZE": "2"}, "a": {"SSM_LAYERS": ""}, "d": {}}[kind]
        write_run(folder, f"p360_{kind}_s{seed}", seed, score, knobs=knobs)
    return scores


def run_main(args: list, capsys) -> tuple:
    rc = cmp.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ---------------------------------------------------------------- reading and grouping

def test_a_run_is_read_from_its_facts_and_its_log(tmp_path):
    write_run(tmp_path, "r", 7, 1.25, loader_tokens=3_000_000_000)
    runs, others = cmp.load([str(tmp_path)])
    (run,) = runs
    assert others == [] and run.problem is None and run.seed == 7 and run.steps == 500
    assert run.scores["sliding"][1] == 1.25 and run.scores["roundtrip"][1] == pytest.approx(1.266)
    assert run.scores["pre_export"][1] == pytest.approx(1.263) and run.bytes_total == 15990000
    assert run.export_s == 14.0 and run.eval_s == 25.8 and run.valid is True and run.hardware == "1x NVIDIA H200"
    assert run.tokens_trained == 500 * 786432 and run.passes_over_data == pytest.approx(500 * 786432 / 3e9)
    assert run.source_blob == hashlib.sha1(b"blob %d\0" % len(SOURCE.rstrip("\n").encode())
                                           + SOURCE.rstrip("\n").encode()).hexdigest()
    assert [s for s, _, _ in run.curve] == [1, 2, 100, 200, 300, 400, 500]
    # naming one file of a run reads both
    (again,), _ = cmp.load([str(tmp_path / "r.json")])
    assert again.scores == run.scores and again.curve == run.curve


def test_older_facts_are_completed_from_the_log(tmp_path):
    write_run(tmp_path, "old", 1, 1.24)
    facts = json.loads((tmp_path / "old.json").read_text())
    for key in ("tokens_per_s", "export_seconds", "pre_quant_val_bpb", "pre_quant_val_loss", "bytes_total"):
        del facts[key]
    (tmp_path / "old.json").write_text(json.dumps(facts))
    (run,), _ = cmp.load([str(tmp_path)])
    assert run.tokens_per_s == pytest.approx(786432 / 0.7, rel=1e-6) and run.export_s == 14.0
    assert run.scores["pre_export"][1] == pytest.approx(1.253) and run.bytes_total == 15990000
    assert run.passes_over_data is None  # the log does not state the train shards' token count


def test_the_document_isolated_and_ttt_passes_are_read_from_a_log_alone(tmp_path, capsys):
    """A LoRA run logs each document alone, then TTT: both scores and both passes' seconds are read from the log
    (here its facts hold neither), TTT the headline, and the table shows both."""
    write_run(tmp_path, "lora", 1, 1.25)
    facts = json.loads((tmp_path / "lora.json").read_text())
    del facts["results"], facts["eval_time_seconds"]
    (tmp_path / "lora.json").write_text(json.dumps(facts))
    log = tmp_path / "lora.txt"
    extra = ["final_mixed_doc_isolated val_loss:3.1000 val_bpb:1.2480 seq_len:2048 chunk:48 eval_time:24000ms",
             "final_mixed_doc_isolated_exact val_loss:3.10000000 val_bpb:1.24800000",
             "final_mixed_ttt val_loss:3.0900 val_bpb:1.2420 seq_len:2048 chunk:48 eval_time:321000ms",
             "final_mixed_ttt_exact val_loss:3.09000000 val_bpb:1.24200000"]
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1] + extra + lines[-1:]) + "\n")
    (run,), _ = cmp.load([str(log)])
    assert run.scores["isolated"][1] == 1.248 and run.scores["ttt"][1] == 1.242 and run.headline_pass == "ttt"
    assert run.eval_s == pytest.approx(0.8 + 25.0 + 24.0 + 321.0)
    rc, out, _ = run_main([log], capsys)
    header = next(line for line in out.splitlines() if line.startswith("run "))
    row = next(line for line in out.splitlines() if line.startswith("lora "))
    assert header.split()[10:12] == ["isolated", "ttt"] and row.split()[10:12] == ["1.24800", "1.24200"]


def test_protocols_are_recognised_from_the_config():
    assert cmp.protocol_of(dict(P360)) == "P360" and cmp.protocol_of(dict(P150)) == "P150"
    s786 = {"ITERATIONS": "40", "MAX_WALLCLOCK_SECONDS": "0.0", "TRAIN_BATCH_TOKENS": "786432"}
    assert cmp.protocol_of(s786) == "S786"
    assert cmp.protocol_of(dict(s786, TRAIN_BATCH_TOKENS="131072")) == "other"
    assert cmp.protocol_of(dict(P360, MAX_WALLCLOCK_SECONDS="600.0")) == "other"
    assert cmp.protocol_of({}) == "?"


def test_runs_are_grouped_by_the_knobs_that_differ_from_the_most_common(tmp_path, capsys):
    scores = ablation(tmp_path)
    runs, _ = cmp.load([str(tmp_path)])
    reference, ties = cmp.modal_config(runs)
    assert ties == [] and reference["QKV_CONV_SIZE"] == "0" and reference["SSM_LAYERS"] == "0,1"
    groups = cmp.group_runs(runs, reference)
    assert [g.label for g in groups] == ["reference configuration", "QKV_CONV_SIZE=2", "SSM_LAYERS=''"]
    assert [r.name for r in groups[1].runs] == ["p360_c_s1", "p360_c_s2", "p360_c_s3"]
    rc, out, err = run_main([tmp_path], capsys)
    assert rc == 0 and err == ""
    ref = [scores[("d", s)] for s in (1, 2, 3)]
    conv = [scores[("c", s)] for s in (1, 2, 3)]
    diff = statistics.fmean(conv) - statistics.fmean(ref)
    test = cmp.ss.t_test(conv, statistics.fmean(ref), 0.0)
    conv_line = next(line for line in out.splitlines() if "p360_c_s3" in line)
    summary = out.splitlines()[out.splitlines().index(conv_line) + 1]
    assert f"vs reference {diff:+.5f}" in summary and f"p={test['p']:.3g}" in summary
    assert f"spread (sample std) {statistics.stdev(conv):.5f}" in summary and "seeds 1, 2, 3" in summary
    assert out.index("[reference configuration]") < out.index("[QKV_CONV_SIZE=2]") < out.index("[SSM_LAYERS='']")
    assert "p not computable (needs at least 2 seeds)" in out  # the one SSM_LAYERS='' run


def test_the_t_test_is_summarize_seeds(tmp_path):
    """One t-test in the project: compare.py uses records/summarize_seeds.py's, which the records use."""
    assert Path(cmp.ss.t_test.__code__.co_filename).resolve() == ROOT / "records" / "summarize_seeds.py"
    values, ref = [1.2270, 1.2260, 1.2281], 1.2300
    t = (ref - statistics.fmean(values)) / (statistics.stdev(values) / math.sqrt(3))
    p = 1 - (0.5 + t / (2 * math.sqrt(2 + t * t)))  # Student t with 2 degrees of freedom, closed form
    assert cmp.ss.t_test(values, ref, 0.0)["p"] == pytest.approx(p, rel=1e-9)


def test_reference_run_and_headline_options(tmp_path, capsys):
    scores = ablation(tmp_path)
    rc, out, _ = run_main([tmp_path, "--reference", "p360_c_s1", "--headline", "roundtrip"], capsys)
    assert rc == 0 and "reference: the configuration of p360_c_s1" in out and "headline: roundtrip bpb" in out
    assert "[QKV_CONV_SIZE=0]" in out and "[QKV_CONV_SIZE=0 SSM_LAYERS='']" in out
    conv = [scores[("c", s)] + 0.016 for s in (1, 2, 3)]
    default = [scores[("d", s)] + 0.016 for s in (1, 2, 3)]
    assert f"vs reference {statistics.fmean(default) - statistics.fmean(conv):+.5f}" in out
    rc, _, err = run_main([tmp_path, "--reference", "nonesuch"], capsys)
    assert rc == 2 and "nonesuch" in err


def test_different_protocol_data_vocabulary_or_hardware_are_never_compared(tmp_path, capsys):
    write_run(tmp_path, "base_s1", 1, 1.23)
    write_run(tmp_path, "base_s2", 2, 1.24)
    write_run(tmp_path, "p150", 1, 1.30, knobs=P150)
    write_run(tmp_path, "enwiki", 1, 1.26, knobs={"DATA_PATH": "/tmp/enwiki",
                                                  "TOKENIZER_PATH": "/tmp/enwiki/fineweb_1024_bpe.model",
                                                  "VOCAB_SIZE": "1024"})
    write_run(tmp_path, "vocab", 1, 1.22, knobs={"VOCAB_SIZE": "4096",
                                                 "TOKENIZER_PATH": "/tmp/sp8192/fineweb_4096_bpe.model"})
    write_run(tmp_path, "h100", 1, 1.21, hardware="8x NVIDIA H100 80GB HBM3")
    write_run(tmp_path, "prefix", 1, 1.20, knobs={"VAL_MAX_TOKENS": "131072"})
    runs, _ = cmp.load([str(tmp_path)])
    assert len({cmp.comparison_key(r) for r in runs}) == 6
    rc, out, _ = run_main([tmp_path], capsys)
    assert "6 comparisons: runs of different protocol, data, vocabulary or hardware are never compared" in out
    sections = out.split("\n== ")[1:]
    assert len(sections) == 6
    for section in sections:  # each section holds only its own runs, and only base holds a comparison
        names = {line.split()[0] for line in section.splitlines() if line and not line.startswith(" ")
                 and line.split()[0] in {r.name for r in runs}}
        assert names in ({"base_s1", "base_s2"}, {"p150"}, {"enwiki"}, {"vocab"}, {"h100"}, {"prefix"})
        assert ("vs reference" in section) is False  # one configuration each: nothing to set against
    assert "P150 | data /tmp/sp8192" in out and "8x NVIDIA H100" in out and "first 131072 validation tokens" in out


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_get_one_line_each_and_the_table_is_still_printed(tmp_path, capsys):
    ablation(tmp_path)
    (tmp_path / "truncated.json").write_text('{"run_id": "truncated", "status": "evalu')
    (tmp_path / "foreign.json").write_text('{"name": "not a run", "items": [1, 2]}')
    write_run(tmp_path, "nofacts", 5, 1.2, write_facts=False)
    write_run(tmp_path, "running", 6, 1.2, status="started")
    write_run(tmp_path, "crashed", 7, 1.2, status="failed")
    write_run(tmp_path, "exported", 8, 1.2, status="exported")
    (tmp_path / "bench.txt").write_text("timings of something\n")
    rc, out, err = run_main([tmp_path, tmp_path / "missing_*.json"], capsys)
    assert rc == 0
    apart = out.split("Listed apart")[1]
    expected = {"truncated.json": "not JSON (truncated?)", "foreign.json": "not the facts of a train_gpt.py run",
                "nofacts.txt": "a log without its facts nofacts.json", "running.json": "not finished: status 'started'",
                "crashed.json": "failed: RuntimeError: CUDA out of memory",
                "exported.json": "not finished: status 'exported'"}
    for file, reason in expected.items():
        (line,) = [line for line in apart.splitlines() if file in line]
        assert reason in line
    assert "last line: 'step:200/20000" in apart  # where the run in progress has got to
    assert "Not run logs (1): bench.txt" in out and "missing_*.json: no such file" in out
    assert "[QKV_CONV_SIZE=2]" in out and "p360_c_s3" in out.split("Listed apart")[0]


# ---------------------------------------------------------------- the index of logs/README.md

def test_markdown_index_of_synthetic_logs(tmp_path, capsys):
    ablation(tmp_path)
    write_run(tmp_path, "crashed", 7, 1.2, status="failed")
    write_run(tmp_path, "p150_a", 1, 1.30, knobs=P150, source="other = 1\n")
    for name, gate in (("p360_new_s1", "0"), ("p360_new_s2", "0"), ("p360_gate_s1", "12")):  # a newer script's knob
        write_run(tmp_path, name, 1, 1.2, knobs={"ATTN_GATE": gate}, source="newer = 1\n")
    for name, valid, apart in (("v_full", True, True), ("v_proxy", False, True), ("v_broke", False, False)):
        write_run(tmp_path, name, 1, 1.2, facts_extra={"valid": valid, "valid_except_hardware_and_data": apart})
    rc, out, _ = run_main([tmp_path, "--markdown"], capsys)
    assert rc == 0 and out.startswith(cmp.INDEX_BEGIN) and out.rstrip().endswith(cmp.INDEX_END)
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| `")}
    blob = subprocess.run(["git", "hash-object", "--stdin"], input=SOURCE.rstrip("\n").encode(),
                          capture_output=True, check=True).stdout.decode().strip()
    assert rows["p360_d_s1.txt"] == [f"`{blob[:10]}`", "P360, sp8192 data, vocab 8192", "default",
                                     "1.23100 (sliding)", "yes (older verdict)"]  # no hardware, split rules
    assert [rows[f"v_{k}.txt"][4] for k in ("full", "proxy", "broke")] == ["yes", "no (yes but hardware, data)", "no"]
    assert rows["p360_c_s2.txt"][2] == "QKV_CONV_SIZE=2" and rows["p360_a_s1.txt"][2] == "SSM_LAYERS=''"
    assert rows["crashed.txt"][3:] == ["-", "failed"]
    # a knob only some scripts have is compared among the runs that set it: at its usual value it is no variant
    assert rows["p360_new_s1.txt"][2] == "default" and rows["p360_gate_s1.txt"][2] == "ATTN_GATE=12"
    assert rows["p150_a.txt"][:3] == [f"`{cmp.git_blob_id(b'other = 1')[:10]}`", "P150, sp8192 data, vocab 8192",
                                      "default"]

    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nHand-written notes.\n")
    assert cmp.main([str(tmp_path), "--markdown", "--output", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\n" + out) and text.endswith("Hand-written notes.\n")
    write_run(tmp_path, "p360_d_s4", 4, 1.2300)  # a new run: the block is replaced, the notes stay
    assert cmp.main([str(tmp_path), "--markdown", "--output", str(readme)]) == 0
    text = readme.read_text()
    assert text.count(cmp.INDEX_BEGIN) == 1 and "p360_d_s4.txt" in text and text.endswith("Hand-written notes.\n")
    readme.write_text(text.replace(cmp.INDEX_END, ""))  # a half-deleted block is refused, not doubled
    assert cmp.main([str(tmp_path), "--markdown", "--output", str(readme)]) == 2
    assert readme.read_text() == text.replace(cmp.INDEX_END, "")
    with pytest.raises(ValueError, match="headline"):
        cmp.table([], headline="best")
    capsys.readouterr()


def test_the_committed_index_is_what_the_script_generates_from_the_committed_logs():
    readme = (ROOT / "logs" / "README.md").read_text(encoding="utf-8")
    committed = cmp.committed_index(readme)
    assert committed is not None, "logs/README.md has no index block"
    assert readme.split("\n", 2)[1:2] == [""] and readme.index(cmp.INDEX_BEGIN) == readme.index("\n") + 2
    runs, others = cmp.load([str(ROOT / "logs")])
    assert committed == cmp.markdown_index(runs, others), \
        "the index in logs/README.md is stale: python3 scripts/compare.py --markdown --output logs/README.md"


# ---------------------------------------------------------------- the plot

def test_plot_without_matplotlib_says_how_to_get_it_and_still_prints_the_table(tmp_path, capsys, monkeypatch):
    ablation(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an absent package looks like to import
    rc, out, err = run_main([tmp_path, "--plot", tmp_path / "p.png"], capsys)
    assert rc == 1 and "pip install matplotlib" in err and not (tmp_path / "p.png").exists()
    assert "[QKV_CONV_SIZE=2]" in out and "p360_c_s3" in out


def test_plot_labels_come_from_the_knobs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ablation(tmp_path)
    rc, out, _ = run_main([tmp_path, "--plot", tmp_path / "p.png"], capsys)
    assert rc == 0 and (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs, _ = cmp.load([str(tmp_path)])
    labels = cmp.plot_labels(runs)
    assert labels["p360_c_s1"] == labels["p360_c_s2"] == "QKV_CONV_SIZE=2 SSM_LAYERS=0,1"
    assert labels["p360_a_s1"] == "QKV_CONV_SIZE=0 SSM_LAYERS=''"
    assert not any(name in text for text in labels.values() for name in labels)
