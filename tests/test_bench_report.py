"""benchmarks/bench_report.py --quick: runs, writes its JSON summary, and counts the encoder consistently."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_report.py"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_report") / "summary.json"
    # its own session, so that a timeout ends the report worker too (the script forks it through sh)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--quick", "--json-out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)  # ~20 s on 2 quiet cores; minutes on a crowded machine
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout, json.loads(out.read_text())


def test_quick_summary_has_the_fields(quick):
    stdout, summary = quick
    tagged = [line for line in stdout.splitlines() if line.startswith("BENCH_REPORT_JSON ")]
    assert len(tagged) == 1 and json.loads(tagged[0].split(" ", 1)[1]) == summary   # stdout line == the file
    for key in ("n", "latent_dim", "wall_s", "cpu_s", "timings_s", "cpu_timings_s", "peak_rss_mb",
                "peak_rss_delta_mb", "encoder_calls", "encoded_rows", "encoded_rows_per_datapoint",
                "per_metric_encodes", "values", "machine", "runs"):
        assert key in summary, key
    assert summary["n"] == 1000 and summary["latent_dim"] == 64 and len(summary["runs"]) == 1
    assert "iw_nll" not in summary["metrics"] and "iw_curve" not in summary["metrics"]
    assert {"rate", "aggregate", "decoding", "linear_probe"} <= set(summary["timings_s"])
    assert all(t >= 0 for t in summary["timings_s"].values())
    assert sum(summary["timings_s"].values()) <= summary["wall_s"] + 1e-6           # metric times within the wall
    assert summary["peak_rss_mb"] > 0 and summary["values"]["rate"] > 0
    assert "metric" in stdout and "total" in stdout and "CPU s" in stdout                          # the readable table


def test_quick_encoder_count_is_consistent(quick):
    _, summary = quick
    n, per = summary["n"], summary["per_metric_encodes"]
    assert sum(e["encoder_calls"] for e in per.values()) == summary["encoder_calls"]
    assert sum(e["encoded_rows"] for e in per.values()) == summary["encoded_rows"]
    assert summary["encoded_rows_per_datapoint"] == summary["encoded_rows"] / n
    assert 1 <= summary["encoder_calls"] <= summary["encoded_rows"]
    assert per["rate"]["encoded_rows"] == n                                          # one pass over the data
    for name, e in per.items():  # every metric encodes whole passes over the data, or nothing
        assert e["encoded_rows"] % n == 0, (name, e)
        assert (e["encoder_calls"] == 0) == (e["encoded_rows"] == 0), (name, e)
