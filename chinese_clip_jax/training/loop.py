"""The training loop: config -> model, mesh, state (fresh, converted or resumed) -> steps,
logging, evaluation, checkpoints.

``train(config, workdir)`` reads the keys documented in ``train/configs/base.py``. It appends
one JSON object per log/eval step to ``workdir/metrics.jsonl`` (a resumed run appends to the
same file, after dropping the lines of steps past the checkpoint it resumes from), writes
TensorBoard events to ``workdir/tensorboard`` (``run_log.RunLog``: on a ``gs://`` workdir both
are staged locally and copied at each eval, checkpoint and exit) and shows a progress bar.
``epochs`` > 0 derives ``total_steps`` from the opened train split (``run_length``). SIGTERM
saves a checkpoint and returns; a non-finite loss raises ``FloatingPointError`` naming the step,
without saving.

Before anything is built the config is validated (``validate.validate_config``) and the workdir
locked (``workdir.WorkdirLock``); a rerun checks the model against the one its checkpoints hold
and resumes from the newest readable checkpoint (``Checkpointer.restore_latest_readable``).
A full disk ends in one ``OSError`` after Orbax's temporary files are removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding as shd
from ..io import atomic_output, atomic_write, first_line, is_disk_full, silence_orbax_after_failure
from ..modeling import ChineseCLIPModel
from ..modeling.config import ChineseCLIPConfig, parse_dtype
from ..modeling.lora import LORA_KEY, merge_lora
from .checkpoint import Checkpointer, abstract_like
from .defaults import resolve_run_options
from .evaluator import Evaluator
from .losses import SIGLIP_INIT_LOGIT_BIAS
from .optim import make_optimizer
from .run_length import resolve_run_length
from .run_log import RunLog
from .state import create_train_state
from .step import batch_keys, train_step_for
from .validate import build_model_config, lora_settings, unfreeze_settings, validate_config
from .workdir import WorkdirLock, check_model_config

__all__ = ["train", "TrainResult"]

logger = logging.getLogger(__name__)


class _Preemption:
    """Says when to save and stop after SIGTERM (a preemption notice), at the same step on every process.

    One process: a Python SIGTERM handler sets a flag. Several processes: JAX's preemption sync
    point (``multihost_utils.reached_preemption_sync_point``: the coordination service's
    notifier catches SIGTERM on any host and agrees on a step), with no per-step collective;
    without that service, an all-gather of the flag at log and checkpoint steps only.
    """

    def __init__(self):
        self.requested = False
        self._sync_point = jax.process_count() > 1 and _preemption_service_running()
        self._previous = None
        if not self._sync_point:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int, agree: bool = True) -> bool:
        """Whether to stop after ``step``. ``agree``: a step where every process may exchange a flag
        (the loop passes its log and checkpoint steps); several processes without the preemption
        service agree by one all-gather there only, so a stop is seen at the next such step."""
        if self._sync_point:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() == 1:
            return self.requested
        if not agree:
            return False
        from jax.experimental import multihost_utils  # no preemption service: agree by all-gather

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _preemption_service_running() -> bool:
    from jax._src import distributed

    return distributed.global_state.client is not None and distributed.global_state.preemption_sync_manager is not None


class TrainResult(dict):
    """What ``train`` returns: ``step``, ``total_steps`` (derived, with ``epochs``), ``stopped_early``
    (SIGTERM), ``first_eval``, ``last_eval``, ``chance``, ``checkpoint_dir``, ``steps_run`` (0: the
    run was already finished), ``wall_s``, ``samples_per_sec``, ``figure`` (DIR/demo.png or
    DIR/summary.png, with evals) and, with ``export_hf``, ``export_dir`` (HF layout that
    ``ccj.from_pretrained`` and transformers read)."""


def _load_init(config, dtype, scan_layers):
    from ..conversion import from_pretrained
    from ..io import is_local, staged_input

    src, image_size = config.init_from, config.model.image_size or None
    if is_local(src):  # a local path or a hub id
        model, params = from_pretrained(src, dtype=dtype, scan_layers=scan_layers, image_size=image_size)
        return model.config, params
    with staged_input(src, what="init_from") as local:  # a gs:// checkpoint, copied once
        model, params = from_pretrained(str(local), dtype=dtype, scan_layers=scan_layers, image_size=image_size)
    return model.config, params


def train(config, workdir: str, *, data_iter=None, eval_sets=None, progress: bool = True) -> TrainResult:
    """Runs (or resumes) training as ``config`` says; returns a ``TrainResult``.

    ``data_iter`` / ``eval_sets`` replace ``chinese_clip_jax.data``'s (tests); a replacement
    iterator must yield this process's numpy batches and have ``get_state`` / ``set_state``.
    """
    from ..io import as_path

    t_start = time.time()
    validate_config(config)  # every value, before anything is built
    workdir = as_path(workdir, what="workdir")  # a bad scheme or missing backend fails here, first
    if "://" in str(config.init_from):
        as_path(config.init_from, what="init_from")
    workdir.mkdir(parents=True, exist_ok=True)
    lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    try:
        return _train(config, workdir, data_iter, eval_sets, progress, t_start)
    except Exception as e:
        if not is_disk_full(e):
            raise
        silence_orbax_after_failure()
        _remove_temporaries(workdir)
        raise OSError(
            f"disk full (or file-size limit) while writing in {workdir}: {first_line(e)}; "
            "temporary checkpoint files were removed; free space and rerun to resume from the last "
            "checkpoint"
        ) from None
    finally:
        if lock is not None:
            lock.release()


def _remove_temporaries(workdir) -> None:
    """Orbax's ``*.orbax-checkpoint-tmp*`` directories and our ``*.tmp`` files (process 0, local workdirs)."""
    import shutil

    if jax.process_index() != 0 or "://" in str(workdir):
        return
    for root, dirs, files in os.walk(str(workdir)):
        for d in [d for d in dirs if ".orbax-checkpoint-tmp" in d]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
            dirs.remove(d)
        for f in files:
            if re.search(r"\.tmp\d*$", f) or ".orbax-checkpoint-tmp" in f:  # ours: io.atomic_output
                os.remove(os.path.join(root, f))


def _architecture(model_config: ChineseCLIPConfig) -> dict:
    """The keys of the model config that decide the checkpoint's contents (no dropout rates)."""

    def keep(d):
        return {
            k: keep(v) if isinstance(v, dict) else v
            for k, v in d.items()
            if not k.endswith(("dropout", "dropout_prob", "initializer_range"))
        }

    d = model_config.to_dict()
    d.update(text_config=model_config.text_config.to_dict(), vision_config=model_config.vision_config.to_dict())
    for key in model_config.extra:
        d.pop(key, None)
    for sub, cfg in (("text_config", model_config.text_config), ("vision_config", model_config.vision_config)):
        for key in cfg.extra:
            d[sub].pop(key, None)
    return keep(d)


def _record_run_options(workdir, options, param_counts: dict | None = None, extra: dict | None = None) -> None:
    """Prints the resolved run options once and writes them to DIR/run_options.json (process 0).

    Called again with ``param_counts`` (``trainable_params``, ``total_params``,
    ``trainable_fraction``) once the state exists: the file is rewritten with them, and one line
    says how much of the model trains."""
    if jax.process_index() != 0:
        return
    if param_counts is None:
        print(options.describe(), flush=True)
        logger.info("%s", options.describe())
    else:
        line = (
            f"trainable params: {param_counts['trainable_params']:,} of {param_counts['total_params']:,} "
            f"({100 * param_counts['trainable_fraction']:.2f}%)"
        )
        print(line, flush=True)
        logger.info("%s", line)
    path = workdir / "run_options.json"
    record = {**options.as_dict(), **(extra or {}), **(param_counts or {})}
    atomic_write(path, json.dumps(record, indent=1, sort_keys=True))


def _has_checkpoints(ckpt_dir) -> bool:
    """Whether DIR/checkpoints holds a step to resume from (a directory named by its step)."""
    return ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())


def _recorded_accum_steps(workdir) -> int | None:
    """The accum_steps an earlier start of this run chose for "auto" (DIR/run_options.json), if it
    has checkpoints to resume; None otherwise."""
    if not _has_checkpoints(workdir / "checkpoints"):
        return None
    try:
        value = json.loads((workdir / "run_options.json").read_text()).get("accum_steps")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and value >= 1 else None


def resolve_accum_steps(config, model_config, recorded: int | None = None):
    """``config`` with ``accum_steps="auto"`` replaced by a number: ``recorded``, the one this run
    chose at its first start (``_recorded_accum_steps``: resumes keep it), 1 on CPU, else the
    fewest micro-batches whose step, compiled for this host's devices, fits their memory
    (``compile.fewest_accum_steps``); a step that fits at no K is a ``ValueError`` with the
    does-not-fit line. Every process gets process 0's K."""
    from .compile import AUTO, AUTO_MARGIN, does_not_fit_line, fewest_accum_steps
    from .targets import local_target

    if config.accum_steps != AUTO:
        return config
    k = recorded if jax.process_index() == 0 else None
    how = "as this run chose at its first start (run_options.json)"
    if k is None:
        target = local_target()
        if target is None:
            k, how = 1, "on CPU"
        else:
            log = (lambda line: print("  " + line, flush=True)) if jax.process_index() == 0 else (lambda _: None)
            k, report, tried = fewest_accum_steps(config, target, model_config=model_config, log=log)
            if k is None:
                raise ValueError("accum_steps 'auto': " + does_not_fit_line(report, margin=AUTO_MARGIN))
            how = f"the fewest micro-batches whose step fits {target.name} ({len(tried)} compiles)"
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        k = int(multihost_utils.broadcast_one_to_all(np.int32(k or 0)))
    if jax.process_index() == 0:
        line = f"accum_steps 'auto' -> {k}: {how}"
        print(line, flush=True)
        logger.info("%s", line)
    c = config.copy_and_resolve_references()
    with c.ignore_type():  # "auto" (a str) -> a number
        c.accum_steps = int(k)
    return c


def _param_counts(params, freeze, unfreeze) -> dict:
    from .optim import label_count, trainable_labels

    trainable, total = label_count(params, trainable_labels(params, freeze, unfreeze))
    return dict(trainable_params=trainable, total_params=total, trainable_fraction=trainable / max(total, 1))


def _train(config, workdir, data_iter, eval_sets, progress, t_start) -> TrainResult:
    options = resolve_run_options(config)  # "auto" keys -> this platform's choice (training/defaults.py)
    recorded_accum = _recorded_accum_steps(workdir) if config.accum_steps == "auto" else None
    _record_run_options(workdir, options)
    dtype = parse_dtype(options.dtype)
    model_opts = options.model_options()
    init_params = None
    if config.init_from:
        model_config, init_params = _load_init(config, dtype, model_opts["scan_layers"])
    else:
        model_config = build_model_config(config.model)
    model = ChineseCLIPModel(
        model_config,
        dtype=dtype,
        **model_opts,
        logit_bias_init=SIGLIP_INIT_LOGIT_BIAS if config.loss == "sigmoid" else None,
    )
    image_size = model_config.vision_config.image_size
    lora = lora_settings(config)
    unfreeze = unfreeze_settings(config)

    ckpt_dir = workdir / "checkpoints"
    resuming = None
    if jax.process_index() == 0:
        resuming = _has_checkpoints(ckpt_dir)
        architecture = _architecture(model_config)
        if lora is not None:  # the adapters are part of what the checkpoints hold
            architecture["lora"] = {k: list(v) if isinstance(v, tuple) else v for k, v in lora.items()}
        check_model_config(workdir, architecture, resuming=resuming)

    config = resolve_accum_steps(config, model_config, recorded_accum)
    mesh = shd.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % (n_batch_shards * config.accum_steps):
        raise ValueError(
            f"batch_size {config.batch_size} must be divisible by data x fsdp ({n_batch_shards}) x "
            f"accum_steps ({config.accum_steps})"
        )
    per_device = config.batch_size // n_batch_shards
    if config.loss_impl == "ring" and config.loss_chunk and per_device % config.loss_chunk:
        raise ValueError(
            f"config.loss_chunk = {config.loss_chunk}: must divide the per-device batch {per_device} "
            f"(batch_size {config.batch_size} / data x fsdp {n_batch_shards})"
        )
    if data_iter is None:
        from .. import data

        data_iter = data.train_iterator(
            config.data,
            global_batch_size=config.batch_size,
            seed=config.seed,
            image_size=image_size,
            context_length=config.context_length,
            labels=config.loss_positives == "label",
        )
    config = resolve_run_length(config, data_iter, workdir, resuming)  # epochs -> total_steps, once
    freeze = config.freeze or None
    tx, schedule = make_optimizer(config.optimizer, config.total_steps, freeze, unfreeze)
    state, shardings = create_train_state(
        model, tx, mesh, config.seed, loss=config.loss, init_params=init_params, lora=lora
    )
    del init_params
    _record_run_options(
        workdir, options, _param_counts(state.params, freeze, unfreeze), extra={"accum_steps": config.accum_steps}
    )
    # what the evaluator and the export see: the model's own tree, adapters merged (modeling.lora)
    model_shardings = {k: v for k, v in shardings.params.items() if k != LORA_KEY}
    merged_params = jax.jit(merge_lora, out_shardings=model_shardings) if lora is not None else (lambda p: p)

    ckpt = Checkpointer(ckpt_dir, config.checkpoint_every, max_to_keep=config.keep_checkpoints)
    state, start = ckpt.restore_latest_readable(abstract_like(state, shardings), data_iter, fresh=state)
    if start:
        logger.info("resumed from %s at step %d", ckpt.directory, start)

    evaluator = None
    if config.eval_every:
        if eval_sets is None:
            from .. import data

            eval_sets = data.eval_sets(config.data, image_size=image_size, context_length=config.context_length)
        resize_mode = config.data.eval_crop
        evaluator = (
            Evaluator(
                model,
                mesh,
                model_shardings,
                eval_sets,
                resize_mode=resize_mode,
                progress=progress and jax.process_index() == 0,
                context_length=config.context_length,
                max_bad=config.data.get("max_bad", -1),
            )
            if eval_sets
            else None
        )

    step_fn = train_step_for(config, options, model, tx, schedule, mesh, shardings, freeze=freeze, unfreeze=unfreeze)
    log = RunLog(workdir, start)
    preempt = _Preemption()
    result = TrainResult(
        step=start,
        stopped_early=False,
        first_eval=None,
        last_eval=None,
        checkpoint_dir=str(ckpt.directory),
        chance=evaluator.chance() if evaluator else None,
    )

    def run_eval(step):
        metrics = evaluator(merged_params(state.params))
        log.write(step, metrics)
        log.sync()
        if result["first_eval"] is None:
            result["first_eval"] = dict(metrics, step=step)
        result["last_eval"] = dict(metrics, step=step)
        return metrics

    bar = _progress(progress and jax.process_index() == 0, start, config.total_steps)
    if evaluator is not None and start == 0:
        run_eval(0)
    timed_steps, timed_s, window_s, window_n = 0, 0.0, 0.0, 0
    step = start
    # No host sync on ordinary steps: the step of the first non-finite loss is kept on the device
    # (``_watch_nonfinite``, dispatched after each step) and read, with the metrics, only at log,
    # eval, checkpoint and stop steps, so nothing is logged, evaluated or saved before every loss
    # up to it is checked, and the host can queue steps ahead of the device in between.
    first_nonfinite = jax.device_put(np.int32(-1), shd.replicated(mesh))
    last_loss = float("nan")

    def check_finite(metrics) -> None:
        nonlocal last_loss
        bad, loss = jax.device_get((first_nonfinite, metrics["loss"]))  # waits for the last step
        if bad >= 0:
            ckpt.wait()
            raise FloatingPointError(
                f"non-finite loss at step {bad} (the update from step {bad - 1}); stopping. "
                f"Last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}"
            )
        last_loss = float(loss)

    try:
        while step < config.total_steps:
            t0 = time.perf_counter()
            host = next(data_iter)
            batch = shd.shard_batch({k: host[k] for k in batch_keys(config.loss_positives)}, mesh)
            with shd.use_mesh_and_rules(mesh):
                state, metrics = step_fn(state, batch)
            step += 1
            first_nonfinite = _watch_nonfinite(first_nonfinite, metrics["loss"], np.int32(step))
            log_now = step % config.log_every == 0 or step == config.total_steps
            eval_now = evaluator is not None and (step % config.eval_every == 0 or step == config.total_steps)
            save_now = ckpt.should_save(step)
            stop_now = preempt.should_stop(step, agree=log_now or save_now)
            if log_now or eval_now or stop_now or save_now:  # log_now: also the last step
                check_finite(metrics)
            dt = time.perf_counter() - t0
            if step > start + 1:  # the first step compiles
                timed_steps, timed_s = timed_steps + 1, timed_s + dt
            window_s, window_n = window_s + dt, window_n + 1
            sps = config.batch_size * window_n / window_s
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}", samples_per_s=f"{sps:.0f}", refresh=False)
            if log_now:
                read = jax.device_get({k: metrics[k] for k in ("lr", "logit_scale", "grad_norm")})
                log.write(
                    step,
                    {
                        "train/loss": last_loss,
                        "train/lr": float(read["lr"]),
                        "train/logit_scale": float(read["logit_scale"]),
                        "train/grad_norm": float(read["grad_norm"]),
                        "train/samples_per_sec": sps,
                        **{f"data/{k}": v for k, v in getattr(data_iter, "stats", {}).items()},
                    },
                )
                window_s, window_n = 0.0, 0
            if eval_now:
                run_eval(step)
            if ckpt.save(step, state, data_iter, force=step == config.total_steps):
                log.sync()
            if step == config.total_steps and evaluator is not None:
                result["figure"] = _write_figure(workdir, config, evaluator, log, step)
            if stop_now:
                ckpt.save(step, state, data_iter, force=True)
                result["stopped_early"] = True
                logger.warning("SIGTERM: saved step %d in %s, exiting", step, ckpt.directory)
                break
    finally:
        preempt.restore()
        if bar is not None:
            bar.close()
        ckpt.close()
        log.close()
    stats = getattr(data_iter, "stats", {})
    if stats.get("skipped") and jax.process_index() == 0:  # the one line of data.bad_records
        from ..data.bad_records import skipped_line

        read = stats["skipped"] + stats.get("samples", 0)
        first = getattr(data_iter, "first_bad", "") or "see the log"
        line = skipped_line(stats["skipped"], read, first, what="training samples", listed="the log")
        print(line, file=sys.stderr, flush=True)
    if config.export_hf and not result["stopped_early"]:
        result["export_dir"] = _export_hf(model_config, merged_params(state.params), str(workdir / "hf"))
    result.update(
        step=step,
        total_steps=config.total_steps,
        steps_run=step - start,
        wall_s=time.time() - t_start,
        samples_per_sec=config.batch_size * timed_steps / timed_s if timed_s else float("nan"),
    )
    return result


@jax.jit
def _watch_nonfinite(first: jax.Array, loss: jax.Array, step: jax.Array) -> jax.Array:
    """``first`` (int32, -1 while every loss was finite) -> the first step whose loss is not finite."""
    return jnp.where((first < 0) & ~jnp.isfinite(loss), step, first)


def _write_figure(workdir, config, evaluator, log, step: int) -> str | None:
    """DIR/demo.png (demo data) or DIR/summary.png, and the same picture in TensorBoard."""
    if jax.process_index() != 0:
        return None
    from .figures import run_figure

    image = run_figure(log.rows(), evaluator.sets, evaluator.predictions)
    path = workdir / ("demo.png" if config.data.name == "demo" else "summary.png")
    with atomic_output(path) as f:
        image.save(f, format="PNG")
    log.image("summary", np.asarray(image), step)
    return str(path)


def _export_hf(model_config, params, path: str) -> str:
    """Writes the final params in the HF layout (``save_pretrained``; a ResNet model: our Flax format
    in a sibling ``flax`` directory), from process 0."""
    from .. import conversion
    from ..io import staged_output

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    if model_config.is_resnet:  # no HF layout exists for a ResNet tower: our Flax format instead
        path = os.path.join(os.path.dirname(path), "flax")
    if jax.process_index() == 0:
        params = jax.tree.map(np.asarray, params)
        save = conversion.save_flax if model_config.is_resnet else conversion.save_pretrained
        with staged_output(path, what="export_hf") as local:  # gs://...: written locally, then copied
            save(str(local), model_config, params)
    return path


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from ..console import progress_bar

    return progress_bar(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=2.0)
