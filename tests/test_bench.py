"""Tests for mmlite.bench: the report's structure at the tiniest sizes (no timing assertions)."""

from __future__ import annotations

import argparse
import functools
import json
import math

import pytest
import torch
from torch import nn

from mmlite import bench
from mmlite.bench import BenchSize, benchmark, format_table
from mmlite.experiment import override, preset

TINY = [BenchSize(2, 3, 8, 2)]


def _tiny_job():
    """The tiny preset shrunk to seconds: batches of 8, a 16-wide model with one block of each kind."""
    job = preset("tiny")
    for key, value in [("job.batch_size", 8), ("model.d_model", 16), ("model.d_embed", 16), ("model.cnn_width", 8),
                       ("model.n_heads", 2), ("model.text_depth", 1), ("model.fusion_depth", 1),
                       ("model.decoder_depth", 1)]:
        job = override(job, key, value)
    return job


FAST = dict(warmup=0, steps=1, n_batches=1)  # noqa: C408


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
    assert bench.run(argparse.Namespace(quick=True, device="cpu", out=str(out), presets=["none"])) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["quick"] is True
    assert len(report["results"]) == 3
    assert "training" not in report  # --presets none
    printed = capsys.readouterr().out
    assert "scratch/torch" in printed and "fused within 1.10x" in printed


# ----------------------------------------------------------------------------------- training section
def test_matmul_rate_structure():
    r = bench.matmul_rate(torch.float32, n=48, repeats=3)
    assert r["dtype"] == "float32" and r["n"] == 48 and r["flops"] == 2 * 48 ** 3
    assert r["threads"] == torch.get_num_threads()
    assert 0 < r["ms_min"] <= r["ms_median"]
    assert r["gflops"] == pytest.approx(r["flops"] / (r["ms_min"] / 1e3) / 1e9)
    assert r["gflops"] >= r["gflops_median"] > 0
    for bad in (dict(n=0), dict(repeats=0), dict(warmup=-1), dict(n=2.5)):  # noqa: C408
        with pytest.raises(ValueError):
            bench.matmul_rate(torch.float32, **{"n": 8, **bad})


def test_matmul_rates_compare_bf16_at_the_same_size():
    r = bench.matmul_rates(n=96, repeats=1)
    assert r["float32"]["n"] == 96 and r["float32"]["dtype"] == "float32"
    assert r["bfloat16"]["dtype"] == "bfloat16" and r["bfloat16"]["n"] <= 96
    assert r["float32_same_n"]["n"] == r["bfloat16"]["n"] and r["float32_same_n"]["dtype"] == "float32"
    assert r["bf16_vs_fp32"] == pytest.approx(r["bfloat16"]["gflops"] / r["float32_same_n"]["gflops"])


def test_cpu_features_names_the_bf16_flags():
    info = bench.cpu_features()
    assert set(info) == {"capability", "flags", "flags_source"}
    if info["flags"] is not None:  # Linux
        assert set(info["flags"]) == set(bench.CPU_FLAGS) and all(isinstance(v, bool) for v in info["flags"].values())


def test_flop_counter_on_a_linear_training_step_matches_the_analytic_rule():
    b, d_in, d_out = 5, 7, 3
    layer = nn.Linear(d_in, d_out)
    x = torch.randn(b, d_in)
    f = bench.training_step_flops(layer, x, b)
    # forward 2 B in out; backward: the weight's gradient 2 B in out, no input gradient (bias adds are free)
    assert (f["forward"], f["backward"], f["per_step"]) == (2 * b * d_in * d_out, 2 * b * d_in * d_out,
                                                            4 * b * d_in * d_out)
    assert f["rule_3x_forward"] == 6 * b * d_in * d_out and f["per_sample"] == f["per_step"] / b
    assert layer.weight.grad is None  # counting leaves the module as it was
    g = bench.training_step_flops(layer, x.requires_grad_(), b)  # with the input's gradient: exactly 6 B in out
    assert g["per_step"] == 6 * b * d_in * d_out == g["rule_3x_forward"]


@pytest.fixture(scope="module")
def tiny_throughput():
    return bench.training_throughput(_tiny_job(), "tiny", rates={"fp32": 10.0}, warmup=1, steps=2, n_batches=1)


def test_training_throughput_structure(tiny_throughput):
    r = json.loads(json.dumps(tiny_throughput))  # JSON-serialisable
    assert r["preset"] == "tiny" and r["batch_size"] == 8 and r["image_size"] == 32
    assert (r["warmup"], r["steps"], r["n_batches"]) == (1, 2, 1)
    assert r["parameters"] > 0 and r["data_ms_per_batch"] > 0
    assert r["objectives"] == ["itc", "itm", "mlm", "vqa", "caption"]
    f = r["flops"]
    assert f["forward"] > 0 and f["backward"] > f["forward"]  # backward ~ 2 x forward
    assert f["per_step"] == f["forward"] + f["backward"] == sum(f["by_op"].values())
    assert f["per_sample"] == pytest.approx(f["per_step"] / 8)
    assert 0.5 * f["rule_3x_forward"] < f["per_step"] < 1.5 * f["rule_3x_forward"]
    assert set(r["precisions"]) == {"fp32"}
    row = r["precisions"]["fp32"]
    assert 0 < row["ms_per_step_min"] <= row["ms_per_step"]
    assert row["samples_per_s"] == pytest.approx(8 / (row["ms_per_step"] / 1e3))
    assert row["samples_per_s_best"] >= row["samples_per_s"]
    assert row["mfu_against_gflops"] == 10.0
    assert row["mfu"] == pytest.approx(f["per_sample"] * row["samples_per_s"] / 10e9)
    assert row["mfu_best"] == pytest.approx(f["per_sample"] * row["samples_per_s_best"] / 10e9)
    p = r["profile"]
    assert p["precision"] == "fp32" and p["profiled_ms"] > 0
    assert p["matmul_share"] + p["outside_matmul_share"] == pytest.approx(1.0)
    assert 0 < p["matmul_share"] < 1
    assert 1 <= len(p["top_ops"]) <= 8
    shares = [o["share"] for o in p["top_ops"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-9
    assert any(o["op"] in ("aten::mm", "aten::addmm") for o in p["top_ops"])
    assert all(o["matmul"] == (o["op"] in bench.MATMUL_OPS) and o["calls"] >= 1 for o in p["top_ops"])


def test_training_throughput_takes_turns_between_precisions():
    r = bench.training_throughput(_tiny_job(), "tiny", precisions=("fp32", "bf16"), profile=False,
                                  rates={"fp32": 10.0, "bf16": 5.0}, warmup=0, steps=1, n_batches=1)
    assert set(r["precisions"]) == {"fp32", "bf16"}
    bf = r["precisions"]["bf16"]
    assert bf["mfu"] == pytest.approx(r["flops"]["per_sample"] * bf["samples_per_s"] / 5e9)


def test_training_throughput_refuses_bad_options():
    job = _tiny_job()
    cases = [({"steps": 0}, "steps"), ({"warmup": -1}, "warmup"), ({"n_batches": 0}, "n_batches"),
             ({"precisions": ("fp64",)}, "precision"), ({"precisions": ("fp16",)}, "CUDA"),
             ({"precisions": ("fp32", "fp32")}, "distinct"), ({"precisions": ()}, "distinct")]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            bench.training_throughput(job, **bad)


def test_training_benchmark_section():
    t = bench.training_benchmark(["tiny"], jobs={"tiny": _tiny_job()}, matmul_n=64, matmul_repeats=1, bf16="never",
                                 profile=False, **FAST)
    t = json.loads(json.dumps(t))
    assert set(t) == {"settings", "threads", "load_average", "cpu", "matmul", "flops_source", "mfu", "goal",
                      "presets", "bf16"}
    assert set(t["load_average"]) == {"before", "after", "cpu_count", "note"}
    assert t["settings"]["steps"] == 1 and t["threads"] == torch.get_num_threads()
    assert "FlopCounterMode" in t["flops_source"]
    assert t["goal"] == {"preset": "small", "mfu": 0.5}
    [row] = t["presets"]
    assert row["profile"] is None  # profile=False
    fp = row["precisions"]["fp32"]
    rate = t["matmul"]["mfu_gflops"]
    assert rate == max(t["matmul"]["float32"]["gflops"], t["matmul"]["float32_after"]["gflops"])
    assert t["matmul"]["float32_after"]["n"] == 64
    assert fp["mfu_against_gflops"] == rate
    assert fp["mfu"] == pytest.approx(row["flops"]["per_sample"] * fp["samples_per_s"] / (rate * 1e9))
    assert t["bf16"]["mode"] == "never" and t["bf16"]["training"] is None
    assert t["bf16"]["matmul_ratio"] == t["matmul"]["bf16_vs_fp32"] and t["bf16"]["threshold"] == 1.2
    assert t["bf16"]["note"]
    table = bench.format_training_table(t)
    assert "float32" in table and "\ntiny " in table and "MFU" in table
    lines = bench.training_summary(t)
    assert lines[0].startswith(f"MFU tiny preset: {100 * fp['mfu']:.0f} %")
    assert "bf16: " + t["bf16"]["note"] in lines
    t["load_average"].update(before=0.1, after=2.0 * (t["load_average"]["cpu_count"] or 1))
    assert bench.training_summary(t)[-1].startswith("load average up to")
    t["load_average"].update(before=0.1, after=0.2)
    assert bench.training_summary(t)[-1] == "bf16: " + t["bf16"]["note"]


def _fake_matmul(ratio):
    def rates(n, repeats, device="cpu"):
        f32 = {"dtype": "float32", "n": n, "gflops": 100.0}
        return {"float32": f32, "bfloat16": {"dtype": "bfloat16", "n": n, "gflops": 100.0 * ratio},
                "float32_same_n": f32, "bf16_vs_fp32": ratio}
    return rates


def _fake_throughput(calls):
    def throughput(job, name, precisions=None, rates=None, **kwargs):
        calls.append((name, tuple(precisions or ("fp32",))))
        ms = {"fp32": 200.0, "bf16": 100.0}
        rows = {p: {"ms_per_step": ms[p], "ms_per_step_min": ms[p], "samples_per_s": 8 / ms[p] * 1e3,
                    "samples_per_s_best": 8 / ms[p] * 1e3, "mfu": 0.1, "mfu_best": 0.1}
                for p in (precisions or ("fp32",))}
        return {"preset": name, "batch_size": 8, "parameters": 1000, "flops": {"per_step": 1e9, "per_sample": 1.25e8},
                "precisions": rows, "profile": None}
    return throughput


def test_bf16_training_is_timed_only_where_the_bf16_matmul_is_faster(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "training_throughput", _fake_throughput(calls))
    monkeypatch.setattr(bench, "matmul_rate", lambda dtype, n, repeats, device="cpu": {"n": n, "gflops": 125.0})
    monkeypatch.setattr(bench, "matmul_rates", _fake_matmul(0.05))
    slow = bench.training_benchmark(["tiny", "small"])
    assert calls == [("tiny", ("fp32",)), ("small", ("fp32",))]
    assert slow["bf16"]["faster"] is False and slow["bf16"]["training"] is None
    assert "0.05x float32" in slow["bf16"]["note"]
    assert "not offered as a speed-up" in slow["bf16"]["note"]
    if (slow["cpu"] or {}).get("flags"):
        assert "avx512_bf16: " in slow["bf16"]["note"] and "amx_bf16: " in slow["bf16"]["note"]

    calls.clear()
    monkeypatch.setattr(bench, "matmul_rates", _fake_matmul(3.0))
    fast = bench.training_benchmark(["small"])
    assert calls == [("small", ("fp32",)), ("tiny", ("fp32", "bf16"))]
    bt = fast["bf16"]["training"]
    assert fast["bf16"]["faster"] is True and bt["preset"] == "tiny"
    assert bt["speedup"] == pytest.approx(2.0) and bt["fp32"]["ms_per_step"] == 200.0
    assert "2.00x" in fast["bf16"]["note"] and "2.00x" in bench.format_training_table(fast)
    assert fast["matmul"]["mfu_gflops"] == 125.0  # the faster of before (100) and after (125)
    # 1.25e8 FLOPs per sample x 40 samples/s (8 per 200 ms) / 125 GFLOP/s = 4 %
    assert fast["presets"][0]["precisions"]["fp32"]["mfu"] == pytest.approx(0.04)
    lines = bench.training_summary(fast)
    assert lines[0].startswith("MFU small preset: 4 % (goal >= 50 %)")

    calls.clear()
    bench.training_benchmark(["tiny"], bf16="never")
    assert calls == [("tiny", ("fp32",))]


def test_training_benchmark_refuses_bad_options_before_timing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("timed something")

    monkeypatch.setattr(bench, "matmul_rates", fail)
    for presets, match in [(["huge"], "unknown presets \\['huge'\\]"), (["tiny", "tiny"], "repeat"),
                           (["base"], "sized for a GPU")]:
        with pytest.raises(ValueError, match=match):
            bench.training_benchmark(presets)
    for kwargs, match in [(dict(bf16="maybe"), "bf16 must be one of"), (dict(steps=0), "steps"),  # noqa: C408
                          (dict(warmup=-1), "warmup"), (dict(n_batches=0), "n_batches"),  # noqa: C408
                          (dict(matmul_n=0), "matmul_n"), (dict(matmul_repeats=0), "matmul_repeats"),  # noqa: C408
                          (dict(device="tpu"), "device")]:  # noqa: C408
        with pytest.raises(ValueError, match=match):
            bench.training_benchmark(["tiny"], **kwargs)


def test_run_adds_the_training_section(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "benchmark", functools.partial(bench.benchmark, sizes=TINY, warmup=0, repeats=1,
                                                              min_time_s=0.0))
    fast = functools.partial(bench.training_benchmark, jobs={"tiny": _tiny_job()}, matmul_n=64, matmul_repeats=1,
                             profile=False, bf16="never", **FAST)
    monkeypatch.setattr(bench, "training_benchmark", fast)
    out = tmp_path / "bench.json"
    assert bench.run(argparse.Namespace(quick=True, device="cpu", out=str(out), presets=["tiny"])) == 0
    report = json.loads(out.read_text())
    assert [r["preset"] for r in report["training"]["presets"]] == ["tiny"]
    printed = capsys.readouterr().out
    assert "MFU tiny preset:" in printed and "GFLOP/s" in printed and "bf16: " in printed


def test_presets_option_and_command_line(tmp_path, capsys):
    assert bench._presets_option(None) == ["tiny", "small"]  # a namespace without the option: both
    assert bench._presets_option(["none"]) == []
    with pytest.raises(ValueError, match="cannot be combined"):
        bench._presets_option(["none", "tiny"])
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.presets, args.quick, args.device) == (["tiny", "small"], False, "cpu")
    assert parser.parse_args(["--presets", "small", "--quick"]).presets == ["small"]
    out = tmp_path / "bench.json"
    assert bench.main(["--presets", "base", "--out", str(out)]) == 2  # refused before anything is timed
    assert "sized for a GPU" in capsys.readouterr().err and not out.exists()
    assert bench.main(["--presets", "tiny", "medium", "--out", str(out)]) == 2
    assert "unknown presets ['medium']" in capsys.readouterr().err
