import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGINS = Path(__file__).parent / "plugins"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tensordiff", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "250"})


@pytest.fixture(scope="module")
def bug_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "bug"
    proc = run_cli("trace", "--model", "qwen", "--seq-len", "32", "--target",
                   f"{PLUGINS}/planted.py:scale_layer1_attention", "--out", str(out))
    return out, proc


def test_trace_exit_1_on_divergence_and_reports(bug_run):
    out, proc = bug_run
    assert proc.returncode == 1, proc.stderr
    assert "DIVERGED" in proc.stdout and "model.layers.1.self_attn" in proc.stdout
    # short for a log: culprit, first divergence, the path to the output; the table is in the reports
    assert "path to the output: model.layers.1.self_attn (introduces" in proc.stdout
    assert len(proc.stdout.splitlines()) < 25 and "┃" not in proc.stdout
    assert proc.stderr == ""  # no progress lines without a terminal unless --verbose
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdict"] == "diverged"
    assert summary["culprit"]["module"] == "model.layers.1.self_attn"
    assert set(summary["first_divergence"]) >= {"key", "module", "op", "max_abs", "rel_l2", "index"}
    assert summary["timing"]["target_plain_s"] > 0 and summary["timing"]["target_traced_s"] > 0


def test_diff_and_report_and_inspect(bug_run, tmp_path):
    out, _ = bug_run
    proc = run_cli("diff", str(out / "reference.h5"), str(out / "target.h5"), "--format", "json")
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["culprit"]["module"] == "model.layers.1.self_attn"
    same = run_cli("diff", str(out / "reference.h5"), str(out / "reference.h5"), "--format", "md")
    assert same.returncode == 0 and "MATCH" in same.stdout
    rep = run_cli("report", str(out), "--format", "md")
    assert rep.returncode == 1 and "model.layers.1.self_attn" in rep.stdout
    ins = run_cli("inspect", str(out / "target.h5"), "--limit", "5")
    assert ins.returncode == 0 and "complete" in ins.stdout and "__root__/forward#0/input.input_ids" in ins.stdout


@pytest.mark.parametrize("args, needle", [
    (["diff", "nope.h5", "nope2.h5"], "nope.h5"),
    (["trace", "--model", "missing_file.py:build"], "missing_file.py"),
    (["trace", "--target", "tpu-fp8"], "tpu-fp8"),
    (["trace", "--model", "no/such-local-model"], "no/such-local-model"),
    (["trace", "--level", "everything"], "everything"),
    (["diff", "a.h5", "b.h5", "--format", "pdf"], "pdf"),
    (["trace", "--bogus"], "--bogus"),
    (["nan-hunt-typo"], "nan-hunt-typo"),
    (["trace", "--seq-len", "abc"], "--seq-len"),
    (["diff", "only_one.h5"], "target"),
    (["trace", "--model-class", "NoSuchModelClass", "--model", "."], "NoSuchModelClass"),
])
def test_bad_input_one_line_exit_2(args, needle, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tensordiff", *args, *(["--out", str(tmp_path / "o")]
                           if args[0] == "trace" else [])], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def test_corrupt_trace_is_one_line(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_text("garbage")
    proc = run_cli("inspect", str(bad))
    assert proc.returncode == 2 and "bad.h5" in proc.stderr and "Traceback" not in proc.stderr


def test_per_pattern_tolerance(bug_run):
    out, _ = bug_run
    ref, tgt = str(out / "reference.h5"), str(out / "target.h5")
    loose = run_cli("diff", ref, tgt, "--tol", "*=0.05", "--format", "json")
    assert loose.returncode == 0 and json.loads(loose.stdout)["verdict"] == "match"
    # the attention may make its 1% error: what follows only carries it, every call's own error is
    # within its budget, so the verdict does not rest on the carried output error
    partly = run_cli("diff", ref, tgt, "--tol", "model.layers.1.self_attn*=0.05", "--format", "json")
    summary = json.loads(partly.stdout)
    assert partly.returncode == 0 and summary["verdict"] == "match"
    assert not summary["rounding"]["key"].startswith("model.layers.1.self_attn")
    assert any("accumulated through the network" in n for n in summary["notes"])
    strict = run_cli("diff", ref, tgt, "--tol", "model.layers.1.self_attn*=0.005", "--format", "json")
    assert strict.returncode == 1 and json.loads(strict.stdout)["culprit"]["module"] == "model.layers.1.self_attn"
    bad = run_cli("diff", ref, tgt, "--tol", "nonsense")
    assert bad.returncode == 2 and "--tol" in bad.stderr


def test_no_replay_stats_only_still_localizes(tmp_path):
    out = tmp_path / "nr"
    proc = run_cli("trace", "--model", "qwen", "--seq-len", "32", "--target", f"{PLUGINS}/planted.py:scale_layer1_mlp",
                   "--no-replay", "--save", "stats", "--no-isolate", "--out", str(out))
    assert proc.returncode == 1, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["first_divergence"]["key"] == "model.layers.1.mlp/forward#0/output.0"
    assert summary["culprit"]["module"] == "model.layers.1.mlp" and summary["culprit"]["local_error"] is None
    assert "no replay" in summary["culprit"]["why"]


def test_version_and_verbose_progress(tmp_path):
    ver = run_cli("--version")
    assert ver.returncode == 0 and ver.stdout.startswith("tensordiff ")
    proc = run_cli("--verbose", "trace", "--model", "qwen", "--seq-len", "16", "--target", "cpu",
                   "--out", str(tmp_path / "v"))
    assert proc.returncode == 0, proc.stderr
    assert "capturing the reference" in proc.stderr and "capturing the target" in proc.stderr
    assert "MATCH" in proc.stdout and "compared" in proc.stdout and "worst rel L2" in proc.stdout
