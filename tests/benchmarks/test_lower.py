"""``python -m bench.lower``: the trainer's default step lowered for cuda and tpu on this CPU.

The base config's lowerings are built once per module (lowering only, no compile, batch 8: the
properties checked do not depend on the batch) and shared by the assertions."""

import os
import subprocess
import sys

import pytest
from _makers import REPO as ROOT

BASE = os.path.join(ROOT, "train", "configs", "base.py")
DEMO = os.path.join(ROOT, "train", "configs", "demo.py")


@pytest.fixture(scope="module")
def lower_mod():
    sys.path.insert(0, ROOT)
    from bench import lower

    return lower


def _report(lower_mod, *argv):
    args = lower_mod.parse_args(list(argv))
    return lower_mod.report(args)


@pytest.fixture(scope="module")
def base_cuda(lower_mod):
    return _report(lower_mod, "--config", BASE, "--platform", "cuda", "--batch-size", "8")


def test_cuda_default_options_are_the_fast_ones(base_cuda):
    o = base_cuda["options"]
    assert (o["dtype"], o["attention_impl"], o["scan_layers"], o["rng_impl"], o["remat"]) == (
        "bfloat16",
        "cudnn",
        False,
        "rbg",
        "none",
    )
    assert set(o["source"].values()) == {"auto"}  # the user wrote no key


def test_cuda_base_step_has_fused_attention_forward_and_backward_in_both_towers(base_cuda):
    c = base_cuda["counts"]
    # 12 text layers at 52 tokens (key lengths), 12 image layers at 197 tokens padded to 200
    for seq in (52, 200):
        assert c.get(f"cudnn_attention_forward@{seq}") == 12, (seq, c)
        assert c.get(f"cudnn_attention_backward@{seq}") == 12, (seq, c)
    assert c["cudnn_attention_forward"] == c["cudnn_attention_backward"] == 24


def test_cuda_base_step_draws_each_dropout_mask_once_without_threefry(base_cuda):
    c = base_cuda["counts"]
    assert c.get("full_size_threefry", 0) == 0
    # text dropout: the embeddings' + 2 per layer, each drawn once (nothing recomputed)
    assert c.get("full_size_rng_bit_generator") == 1 + 2 * 12


def test_cuda_base_step_has_no_layer_loop(base_cuda):
    assert base_cuda["counts"].get("while_loops", 0) == 0


def test_unrolled_cost_analysis_flops_match_the_formula(base_cuda):
    ratio = base_cuda["cost_flops"] / base_cuda["formula_flops"]
    assert 0.95 <= ratio <= 1.05, ratio


@pytest.mark.slow
def test_tpu_base_step_lowers(lower_mod):
    r = _report(lower_mod, "--config", BASE, "--platform", "tpu", "--batch-size", "8")
    o = r["options"]
    assert (o["dtype"], o["attention_impl"], o["scan_layers"], o["rng_impl"]) == ("bfloat16", "xla", True, "rbg")
    c = r["counts"]
    assert c.get("while_loops") == 4  # per tower, the scanned layers' forward loop and backward loop
    assert c.get("full_size_rng_bit_generator") == 1 + 2  # embeddings + the text layer body (per iteration)
    assert c.get("full_size_threefry", 0) == 0 and c.get("cudnn_attention_forward", 0) == 0


@pytest.mark.slow
def test_remat_dots_keeps_the_dropout_masks(lower_mod):
    """remat "dots" (scanned, cuda): the backward pass reuses the saved masks, so each dropout
    draws once per layer iteration, as without remat."""
    r = _report(
        lower_mod, "--config", DEMO, "--platform", "cuda", "--batch-size", "8",
        "--set", "model.remat=dots", "--set", "model.text.hidden_dropout_prob=0.1", "--set", "model.scan_layers=True",
    )  # fmt: skip
    c = r["counts"]
    # embeddings' mask outside the loop + 2 per layer body; recomputing them would add 2 more
    assert c.get("full_size_rng_bit_generator") == 1 + 2, c
    assert c.get("cudnn_attention_forward") and c.get("cudnn_attention_backward")


@pytest.mark.slow
def test_fsdp_gathers_weights_in_bf16(tmp_path):
    """The fsdp=8 step compiled on 8 simulated CPU devices: the weight all-gathers move bf16."""
    out = tmp_path / "step.mlir"
    res = subprocess.run(
        [sys.executable, "-m", "bench.lower", "--config", DEMO, "--platform", "cpu", "--batch-size", "16",
         "--mesh", "fsdp=8", "--compile", "--set", "dtype=bfloat16", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("collectives after SPMD partitioning:"))
    counts = {}
    for item in line.split(":", 1)[1].split(","):
        key, n = item.strip().rsplit(" ", 1)
        counts[key] = int(n)
    bf16 = counts.get("all-gather:bf16", 0)
    f32 = counts.get("all-gather:f32", 0)
    # demo: 2 towers x 2 layers x 6 kernels + patch/projections gather bf16; the few f32 gathers are
    # values fp32 by design (the loss's embeddings of the global batch): 7 measured
    assert bf16 >= 24, line
    assert f32 <= 8 < bf16, line
    assert out.read_text().startswith("module @")


def test_cli_rejects_a_bad_mesh_before_work(lower_mod):
    with pytest.raises(SystemExit):
        lower_mod.parse_args(["--config", BASE, "--platform", "cuda", "--batch-size", "8", "--mesh", "fsdp=x"])
