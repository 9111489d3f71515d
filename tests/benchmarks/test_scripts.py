"""The benchmark scripts run end to end on a tiny config (no timing is asserted: machines are noisy)."""

import glob
import json
import os
import subprocess
import sys

import pytest
from _makers import REPO as ROOT


def run_bench(*args, timeout=600):
    res = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.fixture(autouse=True)
def bench_importable(monkeypatch):
    """bench/ holds scripts, not a package: its modules import by name while a test runs."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))


def test_flops_match_the_issue_figure():
    import flops

    import chinese_clip_jax as ccj

    cfg = ccj.ChineseCLIPConfig.preset("chinese-clip-vit-base-patch16")
    assert flops.image_forward_flops(cfg) / 1e9 == pytest.approx(35.1, abs=0.05)  # the issue's 35.1 GFLOPs
    assert flops.text_forward_flops(cfg, 52) / 1e9 == pytest.approx(8.93, abs=0.01)
    per_pair = flops.image_forward_flops(cfg) + flops.text_forward_flops(cfg, 52)
    assert flops.train_step_flops(cfg, 16, 52) == pytest.approx(3 * 16 * per_pair)
    assert flops.layer_flops(4, 8, 2) == 2 * 2 * (4 * 16 + 2 * 32) + 4 * 4 * 4


@pytest.mark.slow
def test_compare_torch_tiny():
    pytest.importorskip("torch")
    out = run_bench("bench/compare_torch.py", "--tiny", "--repeats", "1")
    for program in ("image x2", "text x4x52", "train step x2"):
        assert program in out
    assert "JAX MiB" in out and "torch MiB" in out
    # same weights and inputs: the features agree (printed as "max |JAX - torch| <x>")
    diffs = [
        float(line.split("max |JAX - torch| ")[1].split(",")[0])
        for line in out.splitlines()
        if "max |JAX - torch|" in line
    ]
    assert len(diffs) == 2 and max(diffs) < 1e-4, out


@pytest.mark.slow
def test_device_smoke_with_the_torch_peer(tmp_path):
    pytest.importorskip("torch")
    out = run_bench(
        "bench/device.py",
        "--smoke",
        "--peak-tflops",
        "1",
        "--peer",
        "torch",
        "--impls",
        "xla",
        "--json",
        str(tmp_path / "rows.json"),
    )
    for program in ("train x2", "image x2", "text x2"):
        assert program in out, out
    assert "%" in out  # an MFU figure from the overridden peak
    rows = json.load(open(tmp_path / "rows.json"))
    assert {(r["program"], r["mode"]) for r in rows["peer"]} == {
        ("train x2", "eager"),
        ("train x2", "compile"),
        ("image x2", "eager"),
        ("text x2", "eager"),
    }, rows
    assert all(r["rate"] > 0 and r["flops"] > 0 for r in rows["peer"]), rows["peer"]
    assert all(r["layout"] == "scan" and r["rng_impl"] == "threefry" for r in rows["ours"])
    ratios = [line.split() for line in out.split("ours/compile")[1].splitlines() if line.startswith("smoke")]
    assert len(ratios) == 3 and all(float(r[-2].rstrip("x")) > 0 for r in ratios), out  # ours / peer eager
    assert float(ratios[0][-1].rstrip("x")) > 0 and ratios[1][-1] == "-", out  # ours / peer compile: train only


def test_device_refuses_an_unknown_layout():
    res = subprocess.run(
        [sys.executable, "bench/device.py", "--smoke", "--layouts", "spiral"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert res.returncode == 2 and "--layouts: unknown ['spiral']" in res.stderr


@pytest.mark.slow
def test_profile_step_smoke(tmp_path):
    out = run_bench("bench/profile_step.py", "--smoke", "--top", "5", "--logdir", str(tmp_path / "trace"))
    rows = [line for line in out.splitlines() if line[:3].strip().isdigit()]
    assert len(rows) == 5, out
    import profile_step

    assert all(any(c in r for c in profile_step.CATEGORIES) for r in rows), out
    assert "matmul" in out.split("category")[-1] and glob.glob(str(tmp_path / "trace/plugins/profile/*/*.xplane.pb"))
    shares = [float(r.split()[-1].rstrip("%")) for r in rows]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.5, out


def test_profile_categories():
    import profile_step

    cat = profile_step.categorize
    assert cat("cublas-gemm.3") == cat("gemm_fusion_dot.12") == cat("ynn_fusion.4") == "matmul"
    assert cat("cudnn$fmha.1") == cat("custom-call.7", "__cudnn$fmhaSoftmax") == "attention"
    assert cat("loop_threefry2x32_fusion") == cat("rng-bit-generator.2") == "random bits"
    assert cat("all-reduce.1") == "collective" and cat("input_reduce_fusion.3") == "reduction"
    assert cat("transpose_copy_fusion") == "copy/transpose" and cat("loop_multiply_fusion.9") == "elementwise"


@pytest.mark.slow
def test_train_memory_tiny():
    out = run_bench("bench/train_memory.py", "--tiny", "--steps", "1", "--batch", "4")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("unrolled:", "scan:"))}
    assert set(rows) == {"unrolled:none", "unrolled:full", "scan:none", "scan:full", "scan:dots"}, out
    temp = {k: float(v[0]) for k, v in rows.items()}
    loss = {k: float(v[3]) for k, v in rows.items()}
    for layout in ("unrolled", "scan"):  # remat recomputes, it does not change the loss (init differs per layout)
        assert len({round(v, 4) for k, v in loss.items() if k.startswith(layout)}) == 1, out
    assert 0 < temp["scan:full"] < temp["scan:dots"] < temp["scan:none"], out


@pytest.mark.slow
def test_data_throughput_workers_table_tiny():
    out = run_bench(
        "bench/data_throughput.py",
        "--only",
        "workers",
        "--workers",
        "0,1,2",
        "--images",
        "16",
        "--batches",
        "1",
        "--batch",
        "8",
        "--image-size",
        "32",
    )
    assert "CPU time per 512x512 JPEG -> 32 px" in out and "scaling 1 -> 2 workers:" in out, out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1", "2"] and all(float(r[1]) > 0 for r in rows), out


def test_profile_reads_a_gpu_trace_layout(tmp_path):
    """The device-op line of a GPU trace ("XLA Ops" under /device:GPU:0), as xprof writes it: host
    events are ignored, ops are summed by name, a container's time excludes the ops inside it."""
    import gzip

    import profile_step

    meta = [
        dict(ph="M", name="process_name", pid=1, args=dict(name="/host:CPU")),
        dict(ph="M", name="process_name", pid=2, args=dict(name="/device:GPU:0")),
        dict(ph="M", name="thread_name", pid=1, tid=1, args=dict(name="python")),
        dict(ph="M", name="thread_name", pid=2, tid=1, args=dict(name="Steps")),
        dict(ph="M", name="thread_name", pid=2, tid=2, args=dict(name="XLA Ops")),
    ]
    ops = [
        dict(ph="X", pid=2, tid=2, name="while.1", ts=0, dur=100),
        dict(ph="X", pid=2, tid=2, name="gemm_fusion_dot.3", ts=10, dur=60, args=dict(long_name="%dot = ...")),
        dict(ph="X", pid=2, tid=2, name="loop_threefry_fusion", ts=75, dur=20),
        dict(ph="X", pid=2, tid=2, name="gemm_fusion_dot.3", ts=200, dur=40),
        dict(ph="X", pid=2, tid=1, name="train 0", ts=0, dur=300),
        dict(ph="X", pid=1, tid=1, name="PjitFunction", ts=0, dur=300),
    ]
    d = tmp_path / "plugins" / "profile" / "run1"
    d.mkdir(parents=True)
    with gzip.open(d / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": meta + ops}, f)
    found = profile_step.device_ops(profile_step.find_trace(str(tmp_path)))
    by_name = {}
    for op in found:
        by_name[op["name"]] = by_name.get(op["name"], 0) + op["dur"]
    assert by_name == {"while.1": 20, "gemm_fusion_dot.3": 100, "loop_threefry_fusion": 20}
    table = profile_step.summarize(found, steps=1, step_s=300e-6, top=3)
    first = table.splitlines()[2].split()
    assert first[1] == "gemm_fusion_dot.3" and first[2] == "matmul" and first[-1] == "33.3%", table


@pytest.mark.slow  # a model, a corpus and a ccj-serve subprocess: ~45 s
def test_serve_load_tiny():
    pytest.importorskip("fastapi")
    pytest.importorskip("faiss")
    out = run_bench("bench/serve_load.py", "--tiny", "--images", "16", "--requests", "60", "--direct", "20")
    assert "answered 60 of 60 requests (0 errors)" in out and "| tiny | 8 | 60 |" in out
    assert "compiles {'text': 3, 'image': 3}" in out  # every bucket at start-up, none under load
