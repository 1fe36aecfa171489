"""Tests for mmlite.bench: the report's structure at the tiniest sizes (no timing assertions)."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from mmlite import bench
from mmlite.bench import BenchSize, benchmark, format_table

TINY = [BenchSize(2, 3, 8, 2)]


def test_benchmark_report_structure():
    report = benchmark(sizes=TINY, warmup=0, repeats=1, min_time_s=0.0)
    report = json.loads(json.dumps(report))  # JSON-serialisable as is
    assert set(report) == {"machine", "settings", "targets", "results", "skipped"}
    for key in ("torch", "threads", "device", "cpu_count"):
        assert key in report["machine"]
    assert report["machine"]["device"] == "cpu"
    assert [r["case"] for r in report["results"]] == ["attention", "encoder_block", "gru"]
    for r in report["results"]:
        assert r["size"] == {"batch": 2, "seq": 3, "d_model": 8, "heads": 2, "book": True}
        assert r["label"] == "B2 T3 d8 h2"
        expected = {"mmlite_scratch", "torch"} | ({"mmlite_fused"} if r["case"] != "gru" else set())
        assert set(r["ms"]) == expected
        assert all(math.isfinite(v) and v > 0 for v in r["ms"].values())
        assert set(r["ms_min"]) == expected
        assert all(r["ms_min"][k] <= r["ms"][k] for k in expected)
        assert set(r["ratio"]) == {name.removeprefix("mmlite_") for name in expected - {"torch"}}
        assert r["ratio"]["scratch"] == pytest.approx(r["ms"]["mmlite_scratch"] / r["ms"]["torch"])
    table = format_table(report)
    assert table.count("\n") == 1 + len(report["results"])  # header, rule, one line per row


def test_missing_case_is_skipped_with_a_note(monkeypatch):
    def missing(*_):
        raise LookupError("mmlite.encoders.GRU is not available (test)")

    monkeypatch.setitem(bench._BUILDERS, "gru", missing)
    report = benchmark(sizes=TINY, cases=("gru",), warmup=0, repeats=1, min_time_s=0.0)
    assert report["results"] == []
    assert report["skipped"] == [{"case": "gru", "note": "mmlite.encoders.GRU is not available (test)"}]
    assert "skipped" in format_table(report)
    with pytest.raises(ValueError, match="unknown benchmark cases \\['lstm'\\]"):
        benchmark(sizes=TINY, cases=("lstm",))


def test_run_writes_json_into_a_new_folder(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "QUICK_SIZES", TINY)
    out = tmp_path / "nested" / "bench.json"
    assert bench.run(argparse.Namespace(quick=True, device="cpu", out=str(out))) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["quick"] is True
    assert len(report["results"]) == 3
    printed = capsys.readouterr().out
    assert "scratch/torch" in printed and "fused within 1.10x" in printed
