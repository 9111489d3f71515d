"""Training: GradCache accumulation, frozen towers, the logit-scale clamp, the weight-decay mask,
and the loop: exact resume after kill -9, SIGTERM, a poisoned batch, and a short demo run."""

import json
import math
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
import pytest
from _makers import TESTS, logged_losses, losses_by_step, script_env
from _train_helpers import data_mesh, fake_batches, max_rel_err, opt_config, tiny_config
from _train_run import make_iterator, tiny_train_config

import chinese_clip_jax as ccj
from chinese_clip_jax import sharding as shd
from chinese_clip_jax.training import create_train_state, decay_mask, make_optimizer, make_schedule, make_train_step
from chinese_clip_jax.training.loop import train
from chinese_clip_jax.training.losses import SIGLIP_INIT_LOGIT_BIAS
from chinese_clip_jax.training.recipes import demo
from chinese_clip_jax.training.step import make_grad_fn


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_accum_steps_gives_the_full_batch_gradient(loss):
    model = ccj.ChineseCLIPModel(tiny_config(), logit_bias_init=SIGLIP_INIT_LOGIT_BIAS if loss == "sigmoid" else None)
    tx, _ = make_optimizer(opt_config(), 10)
    state, _ = create_train_state(model, tx, data_mesh(), 0, loss=loss)
    batch = shd.shard_batch(fake_batches(1, 16, seed=5)[0], data_mesh())
    rng = jax.random.PRNGKey(1)
    with shd.use_mesh_and_rules(data_mesh()):
        lf, gf = jax.jit(make_grad_fn(model, data_mesh(), loss=loss, accum_steps=1))(state.params, batch, rng)
        la, ga = jax.jit(make_grad_fn(model, data_mesh(), loss=loss, accum_steps=4))(state.params, batch, rng)
    rel, key_abs = max_rel_err(ga, gf)
    assert abs(float(la) - float(lf)) <= 1e-5 * abs(float(lf))
    norm = float(optax.tree.norm(gf))
    assert norm > 1e-3  # a real gradient, not zeros == zeros
    assert rel <= 1e-5 and key_abs <= 1e-6 * norm, (rel, key_abs)
    if loss == "sigmoid":
        assert float(jnp.abs(gf["logit_bias"])) > 0


def _run_steps(freeze, n=3, **state_overrides):
    model = ccj.ChineseCLIPModel(tiny_config())
    tx, schedule = make_optimizer(opt_config(lr=0.05), 10, freeze=freeze)
    state, shardings = create_train_state(model, tx, data_mesh(), 0)
    if state_overrides:
        state = state.replace(params={**state.params, **state_overrides})
    before = jax.tree.map(np.array, state.params)
    step = make_train_step(model, tx, schedule, data_mesh(), shardings, freeze=freeze)
    scales = []
    with shd.use_mesh_and_rules(data_mesh()):
        for b in fake_batches(n, 8):
            state, m = step(state, shd.shard_batch(b, data_mesh()))
            scales.append(float(state.params["logit_scale"]))
    return before, state, scales


def test_auto_accum_steps_is_1_on_cpu_and_a_resume_keeps_the_one_its_run_chose(tmp_path):
    """``accum_steps="auto"`` (the pretraining recipes'): 1 on this CPU host; a resumed run reads
    the K its first start chose from DIR/run_options.json (only where checkpoints exist)."""
    from chinese_clip_jax.io import as_path
    from chinese_clip_jax.training.loop import _recorded_accum_steps, resolve_accum_steps

    config = demo.get_config()
    config.accum_steps = "auto"
    workdir = as_path(str(tmp_path))
    assert _recorded_accum_steps(workdir) is None
    assert resolve_accum_steps(config, None).accum_steps == 1
    (tmp_path / "run_options.json").write_text(json.dumps({"accum_steps": 8}))
    assert _recorded_accum_steps(workdir) is None  # no checkpoint yet: a fresh start chooses again
    (tmp_path / "checkpoints" / "20").mkdir(parents=True)
    assert _recorded_accum_steps(workdir) == 8
    assert resolve_accum_steps(config, None, recorded=8).accum_steps == 8
    assert config.accum_steps == "auto"  # the caller's config is not changed
    config.accum_steps = 2
    assert resolve_accum_steps(config, None, recorded=8).accum_steps == 2  # a number is kept as given


@pytest.mark.slow
def test_the_trainer_compiles_auto_accum_steps_for_its_devices_and_a_resume_keeps_it(tmp_path, monkeypatch, capsys):
    """The trainer with accum_steps "auto" on devices whose memory (here: this CPU, its usable
    bytes capped between the compiled peaks of K = 2 and K = 4, as an accelerator's
    ``memory_stats`` would give them) fits K = 4 but not K = 2: it trains with 4 and records it;
    the resume keeps 4 although the devices would now fit K = 1."""
    from chinese_clip_jax.training import compile as aot
    from chinese_clip_jax.training import targets

    config = tiny_train_config(2, checkpoint_every=2, batch_size=64)
    config.model.vision.image_size = 32  # activations large enough beside the state for K to matter
    config.mesh.update(data=1, fsdp=1, tensor=1)
    host = targets.Target("cpu", "cpu", jax.devices()[:1], 10**12, "this host")
    peaks = {}
    for k in (2, 4):
        config.accum_steps = k
        peaks[k] = aot.compile_step(config, host).peak_bytes
    assert peaks[4] < 0.95 * peaks[2]
    capped = targets.Target("cpu", "cpu", jax.devices()[:1], int((peaks[2] + peaks[4] / 0.95) / 2), "capped")
    monkeypatch.setattr(targets, "local_target", lambda: capped)
    config.accum_steps = "auto"
    workdir = str(tmp_path / "run")
    assert train(config, workdir, data_iter=make_iterator(config), progress=False)["step"] == 2
    assert "accum_steps 'auto' -> 4: the fewest micro-batches whose step fits" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "run_options.json").read_text())["accum_steps"] == 4
    monkeypatch.setattr(targets, "local_target", lambda: host)  # K = 1 would fit now
    config.total_steps = 3
    assert train(config, workdir, data_iter=make_iterator(config), progress=False)["step"] == 3
    assert "accum_steps 'auto' -> 4: as this run chose at its first start" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "run_options.json").read_text())["accum_steps"] == 4


@pytest.mark.parametrize(
    "freeze,frozen,trained",
    [
        ("image", ("vision_model", "visual_projection"), "text_model"),
        ("text", ("text_model", "text_projection"), "vision_model"),
    ],
)
def test_frozen_tower_is_bitwise_unchanged_and_has_no_moments(freeze, frozen, trained):
    before, state, _ = _run_steps(freeze)
    for key in frozen:
        for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(state.params[key])):
            assert np.array_equal(a, np.asarray(b)) and a.tobytes() == np.asarray(b).tobytes()
    changed = [
        not np.array_equal(a, np.asarray(b))
        for a, b in zip(jax.tree.leaves(before[trained]), jax.tree.leaves(state.params[trained]))
    ]
    assert sum(changed) > len(changed) // 2
    adam = state.opt_state.inner_states["trainable"].inner_state[0][0]
    for key in frozen:  # no moment arrays at all for the frozen tower
        assert jax.tree.leaves(adam.mu[key]) == [] and jax.tree.leaves(adam.nu[key]) == []
    n_params = sum(x.size for k in before if k not in frozen for x in jax.tree.leaves(before[k]))
    n_state = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert n_state == 2 * n_params - sum(  # mu + nu for trainable params only (scalars excluded)
        2 for k in before if k not in frozen for x in jax.tree.leaves(before[k]) if x.ndim == 0
    )


@pytest.mark.slow
def test_logit_scale_never_exceeds_ln100():
    _, state, scales = _run_steps(None, n=3, logit_scale=jnp.float32(6.0))
    assert max(scales) <= math.log(100) + 1e-7
    assert scales[0] == pytest.approx(math.log(100), abs=1e-6)


def test_weight_decay_mask_and_schedule():
    model = ccj.ChineseCLIPModel(tiny_config())
    state, _ = create_train_state(model, make_optimizer(opt_config(), 10)[0], data_mesh(), 0)
    mask = decay_mask(state.params)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat["['text_model']['encoder']['layer_0']['mlp']['fc1']['kernel']"] is True
    assert flat["['visual_projection']['kernel']"] is True
    assert flat["['vision_model']['patch_embedding']['kernel']"] is True
    for no_decay in (
        "['logit_scale']",
        "['text_model']['embeddings']['word_embeddings']['embedding']",
        "['text_model']['encoder']['layer_0']['mlp']['fc1']['bias']",
        "['text_model']['encoder']['layer_0']['attention_norm']['scale']",
        "['vision_model']['class_embedding']",
        "['vision_model']['position_embedding']",
    ):
        assert flat[no_decay] is False, no_decay
    sched = make_schedule(1.0, warmup_steps=10, total_steps=110)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0) and float(sched(60)) == pytest.approx(0.5, abs=1e-6)
    assert float(sched(110)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="freeze must be"):
        make_optimizer(opt_config(), 10, freeze="both")


# ----------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def reference_run(trained_workdir):
    return {
        "losses": losses_by_step(trained_workdir),
        "export_dir": os.path.join(trained_workdir, "hf"),
        "workdir": trained_workdir,
    }


def test_init_from_a_converted_checkpoint(reference_run, tmp_path):
    src = reference_run["export_dir"]
    _, exported = ccj.from_pretrained(src)
    config = tiny_train_config(1, init_from=src, export_hf=True)
    config.optimizer.lr = 0.0  # one step with lr 0: the params must be exactly the loaded ones
    result = train(config, str(tmp_path / "ft"), data_iter=make_iterator(config), progress=False)
    _, after = ccj.from_pretrained(result["export_dir"])
    rel, key_abs = max_rel_err(after, exported)
    assert rel == 0.0 and key_abs == 0.0
    with pytest.raises(ValueError, match="init_from"):
        from chinese_clip_jax.training.recipes import finetune

        train(finetune.get_config(), str(tmp_path / "none"), progress=False)


def test_metrics_file_has_the_documented_keys(reference_run, tmp_path):
    """Every step logs the keys the README documents, with values that mean what it says: the lr of
    that step's update (warmup 2 steps to 3e-3, then cosine to 0 at step 8, by hand), a clamped
    logit scale, a finite positive gradient norm and throughput, the data counters."""
    with open(os.path.join(reference_run["workdir"], "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train_lines = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 9))
    documented = {
        "step",
        "train/loss",
        "train/lr",
        "train/logit_scale",
        "train/grad_norm",
        "train/samples_per_sec",
        "data/skipped",
        "data/skipped_at_index",
        "data/samples",
    }
    for r in train_lines:
        assert set(r) == documented, sorted(set(r) ^ documented)
        k = r["step"] - 1  # the update of step s uses the schedule at s - 1
        lr = 3e-3 * k / 2 if k < 2 else 3e-3 * 0.5 * (1 + math.cos(math.pi * (k - 2) / 6))
        assert r["train/lr"] == pytest.approx(lr, rel=1e-5, abs=1e-9), r["step"]
        assert 0.0 <= r["train/logit_scale"] <= math.log(100) + 1e-6
        assert math.isfinite(r["train/loss"]) and r["train/grad_norm"] > 0 and r["train/samples_per_sec"] > 0
        assert r["data/skipped"] == 0 and r["data/skipped_at_index"] == 0
        assert r["data/samples"] >= 16 * r["step"]  # yielded so far (prefetching runs ahead)


@pytest.mark.slow
def test_kill9_then_rerun_continues_exactly(reference_run, tmp_path):
    workdir = str(tmp_path / "run")
    env = script_env()
    script = os.path.join(TESTS, "_train_run.py")
    proc = subprocess.run(
        [sys.executable, script, workdir, "8", "--kill9-after-checkpoint", "4", "--at-batch", "7"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[:1] == ["4"]
    killed = losses_by_step(workdir)
    assert max(killed) == 6  # steps 5 and 6 ran after the checkpoint, then the kill
    config = tiny_train_config(8)
    result = train(config, workdir, data_iter=make_iterator(config), progress=False)
    assert result["step"] == 8
    resumed = losses_by_step(workdir)
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(reference_run["losses"][step], rel=1e-6, abs=1e-6), step
    with open(os.path.join(workdir, "metrics.jsonl")) as f:  # steps 5, 6 of the killed run were dropped
        logged = [json.loads(line)["step"] for line in f if "train/loss" in line]
    assert logged == list(range(1, 9))


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches(reference_run, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_train_config(8)

    def hook(index, batch):
        if index == 3:  # raised in the loop's thread: handled before the hook returns, never a step late
            signal.raise_signal(signal.SIGTERM)

    result = train(config, workdir, data_iter=make_iterator(config, hook), progress=False)
    assert result["stopped_early"] and result["step"] == 3
    assert "3" in os.listdir(os.path.join(workdir, "checkpoints"))
    result = train(config, workdir, data_iter=make_iterator(config), progress=False)
    assert result["step"] == 8 and not result["stopped_early"]
    resumed = losses_by_step(workdir)
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(reference_run["losses"][step], rel=1e-6, abs=1e-6), step


@pytest.mark.slow
@pytest.mark.parametrize("log_every,poisoned", [(1, 6), (100, 6), (100, 8)])
def test_poisoned_batch_stops_naming_the_step(tmp_path, log_every, poisoned):
    """With log_every=100 the host reads losses one step late (6: found after step 7 was
    dispatched) or at a checkpoint step (8): still the right step, and nothing poisoned is saved."""
    workdir = str(tmp_path / "run")
    config = tiny_train_config(8, log_every=log_every)

    def hook(index, batch):
        if index == poisoned:  # uint8 images cannot be NaN: a float batch (as a custom iterator gives)
            pixels = ccj.processing.normalize_pixels(batch["pixel_values"])
            pixels[0, 0, 0, 0] = np.nan
            return {**batch, "pixel_values": pixels}

    with pytest.raises(FloatingPointError, match=f"at step {poisoned} ") as err:
        train(config, workdir, data_iter=make_iterator(config, hook), progress=False)
    assert "Last good checkpoint: step 4" in str(err.value)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]


@pytest.mark.slow
def test_short_demo_run_lands_far_above_chance(tmp_path):
    from chinese_clip_jax.training.recipes import demo

    config = demo.get_config()
    config.total_steps = 150
    config.eval_every = 150
    config.checkpoint_every = 150
    config.data.demo.eval_per_class = 8
    config.data.demo.num_retrieval = 100
    result = train(config, str(tmp_path / "demo"), progress=False)
    last, chance = result["last_eval"], result["chance"]
    assert chance["zeroshot/top1"] == pytest.approx(1 / 30)
    assert last["zeroshot/top1"] >= 5 * chance["zeroshot/top1"], last
    assert last["retrieval/mean_recall"] >= 2 * chance["retrieval/mean_recall"], last
    # the picture: curves above held-out predictions, also in TensorBoard
    assert result["figure"] == str(tmp_path / "demo" / "demo.png")
    with PIL.Image.open(result["figure"]) as im:
        assert im.mode == "RGB" and im.width > 600 and im.height > 400


@pytest.mark.slow
def test_remat_and_scan_give_the_same_gradient_and_bf16_is_close():
    """remat recomputes, scan stacks layers: same math as the plain fp32 model; bf16 compute keeps
    fp32 params and lands near the fp32 loss and gradient direction."""
    batch = shd.shard_batch(fake_batches(1, 8, seed=3)[0], data_mesh())
    rng = jax.random.PRNGKey(0)
    base = ccj.ChineseCLIPModel(tiny_config())
    state, _ = create_train_state(base, make_optimizer(opt_config(), 10)[0], data_mesh(), 0)
    params = state.params

    def grads(model, p):
        with shd.use_mesh_and_rules(data_mesh()):
            return jax.jit(make_grad_fn(model, data_mesh(), deterministic=True))(p, batch, rng)

    loss, g = grads(base, params)
    with pytest.warns(UserWarning, match="scan_layers=True"):  # unrolled remat does nothing on CPU
        loss_r, g_r = grads(ccj.ChineseCLIPModel(tiny_config(), remat=True), params)
    assert abs(float(loss_r) - float(loss)) <= 1e-6 * abs(float(loss))
    assert max_rel_err(g_r, g)[0] <= 1e-5
    from chinese_clip_jax.conversion import stack_layers, unstack_layers

    for remat in (True, "full", "dots"):
        loss_s, g_s = grads(ccj.ChineseCLIPModel(tiny_config(), scan_layers=True, remat=remat), stack_layers(params))
        assert abs(float(loss_s) - float(loss)) <= 1e-5 * abs(float(loss)), remat
        assert max_rel_err(unstack_layers(g_s), g)[0] <= 1e-4, remat
    loss_b, g_b = grads(ccj.ChineseCLIPModel(tiny_config(), dtype=jnp.bfloat16), params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g_b))
    assert abs(float(loss_b) - float(loss)) <= 2e-2 * abs(float(loss))
    flat_b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g_b)])
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
    assert flat_b @ flat / (np.linalg.norm(flat_b) * np.linalg.norm(flat)) >= 0.98


def _step_temp_bytes(scan: bool, remat) -> int:
    """Bytes of temporaries XLA plans for one train step (activations kept for the backward pass
    included): a property of the compiled program, not a timing."""
    cfg = tiny_config(layers=4)
    cfg = cfg.replace(vision_config=cfg.vision_config.replace(hidden_size=64, intermediate_size=256, image_size=32))
    model = ccj.ChineseCLIPModel(cfg, scan_layers=scan, remat=remat)
    tx, schedule = make_optimizer(opt_config(), 10)
    state, shardings = create_train_state(model, tx, data_mesh(), 0)
    batch = shd.shard_batch(fake_batches(1, 16, seed=3, image=32)[0], data_mesh())
    with shd.use_mesh_and_rules(data_mesh()):
        step = make_train_step(model, tx, schedule, data_mesh(), shardings)
        return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_remat_with_scan_lowers_the_train_step_memory():
    """What each remat policy keeps: "full" less than "dots" less than nothing recomputed. This
    pins that remat really takes effect (XLA:CPU's CSE undoes it for unrolled layers)."""
    none, dots, full = (_step_temp_bytes(True, r) for r in (False, "dots", "full"))
    assert full < dots < none, (full, dots, none)
    assert dots <= 0.8 * none, (dots, none)


def test_bad_remat_value_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"remat must be .*'dots', 'full'.*'sometimes'"):
        ccj.ChineseCLIPModel(tiny_config(), remat="sometimes")
    from chinese_clip_jax.modeling.layers import REMAT_POLICIES, remat_policy

    # what `--config.model.remat=True` / `=False` give on the command line
    assert remat_policy("True") is REMAT_POLICIES["full"] and remat_policy("false") is None


@pytest.mark.slow
def test_two_demo_runs_give_bitwise_equal_losses(tmp_path):
    runs = []
    for name in ("a", "b"):
        config = demo.get_config()
        config.total_steps, config.log_every, config.eval_every, config.export_hf = 30, 1, 0, False
        train(config, str(tmp_path / name), progress=False)
        runs.append(logged_losses(tmp_path / name))
    assert [s for s, _ in runs[0]] == list(range(1, 31))
    assert runs[0] == runs[1]  # exact float equality, step by step
