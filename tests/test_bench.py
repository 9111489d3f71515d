"""The benchmark scripts run end to end on a tiny config (no timing is asserted: machines are noisy)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args, timeout=600):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_flops_match_the_issue_figure(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))  # bench/ holds scripts, not a package
    import flops

    import chinese_clip_jax as ccj

    cfg = ccj.ChineseCLIPConfig.preset("chinese-clip-vit-base-patch16")
    assert flops.image_forward_flops(cfg) / 1e9 == pytest.approx(35.1, abs=0.05)  # the issue's 35.1 GFLOPs
    assert flops.text_forward_flops(cfg, 52) / 1e9 == pytest.approx(8.93, abs=0.01)
    per_pair = flops.image_forward_flops(cfg) + flops.text_forward_flops(cfg, 52)
    assert flops.train_step_flops(cfg, 16, 52) == pytest.approx(3 * 16 * per_pair)
    assert flops.layer_flops(4, 8, 2) == 2 * 2 * (4 * 16 + 2 * 32) + 4 * 4 * 4


def test_compare_torch_tiny():
    pytest.importorskip("torch")
    out = run_script("bench/compare_torch.py", "--tiny", "--repeats", "1")
    for program in ("image x2", "text x4x52", "train step x2"):
        assert program in out
    assert "JAX MiB" in out and "torch MiB" in out
    # same weights and inputs: the features agree (printed as "max |JAX - torch| <x>")
    diffs = [float(line.split("max |JAX - torch| ")[1].split(",")[0]) for line in out.splitlines()
             if "max |JAX - torch|" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-4, out


def test_device_smoke():
    out = run_script("bench/device.py", "--smoke", "--peak-tflops", "1")
    for program in ("train x2", "image x2", "text x2"):
        assert program in out, out
    assert "%" in out  # an MFU figure from the overridden peak


def test_train_memory_tiny():
    out = run_script("bench/train_memory.py", "--tiny", "--steps", "1", "--batch", "4")
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith(("unrolled:", "scan:"))}
    assert set(rows) == {"unrolled:none", "unrolled:full", "scan:none", "scan:full", "scan:dots"}, out
    temp = {k: float(v[0]) for k, v in rows.items()}
    loss = {k: float(v[3]) for k, v in rows.items()}
    for layout in ("unrolled", "scan"):  # remat recomputes, it does not change the loss (init differs per layout)
        assert len({round(v, 4) for k, v in loss.items() if k.startswith(layout)}) == 1, out
    assert 0 < temp["scan:full"] < temp["scan:dots"] < temp["scan:none"], out


def test_data_throughput_workers_table_tiny():
    out = run_script("bench/data_throughput.py", "--only", "workers", "--workers", "0,1,2", "--images", "16",
                     "--batches", "1", "--batch", "8", "--image-size", "32")
    assert "CPU time per 512x512 JPEG -> 32 px" in out and "scaling 1 -> 2 workers:" in out, out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["0", "1", "2"] and all(float(r[1]) > 0 for r in rows), out
