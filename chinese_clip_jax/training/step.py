"""The train step: one ``jax.jit`` with in/out shardings and the donated state.

Loss and gradients are those of the GLOBAL batch. With ``accum_steps = K > 1`` the batch is
split into K micro-batches and the gradient is still exactly the full-batch one (GradCache,
as cn_clip's ``--accum-freq``):

1. embed every micro-batch without gradients (``lax.scan``), giving all (B, D) embeddings;
2. loss of the full batch from those embeddings and its gradient w.r.t. the embeddings
   (and directly w.r.t. ``logit_scale`` / ``logit_bias``);
3. re-run each micro-batch with gradients, pulling back its slice of the embedding gradient
   through the towers (``jax.vjp``), and sum.

Micro-batch k takes rows k, k+K, k+2K, ... so every device keeps working on every micro-batch.
The loss's positives (``loss_positives``: "pair", "caption", "label"; ``group_ids``) are read
from the full batch, so accumulation gives the same groups as one big step.
Dropout keys are ``fold_in(fold_in(state.rng, step), k)`` (threefry), turned into a key of the
configured ``rng_impl`` (``dropout_key``): a pure function of the checkpointed state, so a
resumed run draws the same masks whatever the implementation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import sharding as shd
from ..inference.encoding import image_embeddings, text_embeddings
from ..modeling.lora import merge_lora
from .losses import caption_groups, clamp_logit_scale
from .optim import trainable_labels
from .ring_losses import contrastive_loss_by_impl
from .state import TrainState

__all__ = [
    "make_embed_fn",
    "make_grad_fn",
    "make_train_step",
    "train_step_for",
    "dropout_key",
    "BATCH_KEYS",
    "LOSS_POSITIVES",
    "batch_keys",
    "group_ids",
    "RNG_IMPLS",
]

BATCH_KEYS = ("input_ids", "attention_mask", "pixel_values")
# config.loss_positives: which pairs of a batch are positives of each other. "pair": pair i only
# (CLIP); "caption": pairs whose captions tokenize identically; "label": pairs whose source label
# (the batch's "label", int32 (B,)) is equal.
LOSS_POSITIVES = ("pair", "caption", "label")
LOSS_PARAMS = ("logit_scale", "logit_bias")  # the params the loss reads directly (not through the towers)
# Random-bit generators for dropout (``jax.random`` implementations): threefry (counter-based
# hash, the same bits on every backend and sharding; many integer ops per bit), rbg (XLA's
# RngBitGenerator: Philox on GPU, the hardware generator on TPU; same bits for the same XLA
# build and sharding), unsafe_rbg (rbg with cheaper key splitting and folding).
RNG_IMPLS = ("threefry", "rbg", "unsafe_rbg")


def batch_keys(positives: str = "pair") -> tuple[str, ...]:
    """The batch entries the train step reads: ``BATCH_KEYS``, and "label" for label positives."""
    if positives not in LOSS_POSITIVES:
        raise ValueError(f"loss_positives must be one of {LOSS_POSITIVES}, got {positives!r}")
    return BATCH_KEYS + (("label",) if positives == "label" else ())


def group_ids(batch, positives: str = "pair") -> jax.Array | None:
    """The loss's ``groups`` for a (global) batch: None for "pair", a hash of each caption's
    token ids for "caption" (``losses.caption_groups``), the batch's "label" for "label"."""
    if positives == "pair":
        return None
    if positives == "caption":
        return caption_groups(batch["input_ids"])
    if positives == "label":
        return jnp.asarray(batch["label"], jnp.int32)
    raise ValueError(f"loss_positives must be one of {LOSS_POSITIVES}, got {positives!r}")


def dropout_key(raw: jax.Array, rng_impl: str = "threefry") -> jax.Array:
    """A raw threefry key (uint32[2]) -> the key dropout draws from, of ``rng_impl`` (``RNG_IMPLS``).

    threefry returns ``raw`` itself; rbg / unsafe_rbg get key data hashed from it, so the key is
    a pure function of ``raw`` (resume stays exact)."""
    if rng_impl == "threefry":
        return raw
    if rng_impl not in RNG_IMPLS:
        raise ValueError(f"rng_impl must be one of {RNG_IMPLS}, got {rng_impl!r}")
    return jax.random.wrap_key_data(jax.random.bits(raw, (4,), jnp.uint32), impl=rng_impl)


def make_embed_fn(model, rng_impl: str = "threefry") -> Callable:
    """``embed(params, batch, rng, deterministic) -> (text_embeds, image_embeds)``, L2-normalized fp32
    (``encoding.text_embeddings`` / ``image_embeddings``); ``rng``: a raw threefry key, dropout
    draws from ``dropout_key(rng, rng_impl)``."""
    if rng_impl not in RNG_IMPLS:
        raise ValueError(f"rng_impl must be one of {RNG_IMPLS}, got {rng_impl!r}")

    def embed(params, batch, rng, deterministic=False):
        text = text_embeddings(
            model,
            params,
            batch["input_ids"],
            batch["attention_mask"],
            deterministic=deterministic,
            rng=dropout_key(rng, rng_impl),
        )
        image = image_embeddings(model, params, batch["pixel_values"], deterministic=deterministic)
        return text, image

    return embed


def make_grad_fn(
    model,
    mesh: Mesh,
    *,
    loss: str = "softmax",
    accum_steps: int = 1,
    freeze: str | None = None,
    deterministic: bool = False,
    rng_impl: str = "threefry",
    loss_impl: str = "gather",
    loss_chunk: int = 0,
    unfreeze_last_layers: dict | None = None,
    positives: str = "pair",
) -> Callable:
    """``grad_fn(params, batch, rng) -> (loss, grads)`` for the global batch (not jitted).

    With ``accum_steps > 1`` it runs the GradCache recipe of the module docstring; the result
    equals the ``accum_steps=1`` gradient up to float summation order (dropout aside: the
    micro-batches draw their own masks). Frozen params (``optim.trainable_labels``: ``freeze``,
    ``unfreeze_last_layers``, the base under LoRA) get zero gradients (stop_gradient); LoRA
    adapters (``params["lora"]``) are merged into the kernels they adapt before the towers run
    (``modeling.lora.merge_lora``), so the gradient reaches them through the merged kernels.
    ``loss_impl`` / ``loss_chunk``: how the loss is computed (``ring_losses.contrastive_loss_by_impl``:
    "gather" or "ring", the ring's column slice); same value and gradients. ``positives``: the
    config's ``loss_positives`` (``group_ids``).
    """
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    embed = make_embed_fn(model, rng_impl)
    micro_sharding = NamedSharding(mesh, P(None, shd.BATCH_AXES))

    batch_keys(positives)  # checks the name

    def loss_of(params, text, image, groups):  # reads logit_scale / logit_bias only (top level, never adapted)
        return contrastive_loss_by_impl(
            loss,
            text,
            image,
            params["logit_scale"],
            params.get("logit_bias"),
            groups,
            impl=loss_impl,
            mesh=mesh,
            chunk=loss_chunk,
        )

    def stop_frozen(params):
        labels = trainable_labels(params, freeze, unfreeze_last_layers)
        return jax.tree.map(lambda x, lab: jax.lax.stop_gradient(x) if lab == "frozen" else x, params, labels)

    def full_batch_grad(params, batch, rng):
        def loss_fn(p):
            p = stop_frozen(p)
            text, image = embed(merge_lora(p), batch, jax.random.fold_in(rng, 0), deterministic)
            return loss_of(p, text, image, group_ids(batch, positives))

        return jax.value_and_grad(loss_fn)(params)

    def accumulated_grad(params, batch, rng):
        b = batch["input_ids"].shape[0]
        if b % accum_steps:
            raise ValueError(f"batch {b} is not divisible by accum_steps {accum_steps}")

        def split(x):  # (B, ...) -> (K, B/K, ...); micro-batch k = rows k::K
            x = x.reshape(b // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, micro_sharding)

        micro = {k: split(batch[k]) for k in BATCH_KEYS}
        ks = jnp.arange(accum_steps)
        p = merge_lora(stop_frozen(params))

        def embed_one(_, xs):
            mb, k = xs
            return None, embed(p, mb, jax.random.fold_in(rng, k), deterministic)

        _, (text, image) = jax.lax.scan(embed_one, None, (micro, ks))  # (K, B/K, D) each
        d = text.shape[-1]

        groups = group_ids(batch, positives)  # of the full batch, in batch order

        def loss_from_embeds(p_loss, text, image):  # (K, B/K, D) -> (B, D) in batch order: rows stay on their device
            return loss_of(p_loss, text.swapaxes(0, 1).reshape(b, d), image.swapaxes(0, 1).reshape(b, d), groups)

        p_loss = {k: params[k] for k in LOSS_PARAMS if k in params}
        loss_value, (g_loss, g_text, g_image) = jax.value_and_grad(loss_from_embeds, argnums=(0, 1, 2))(
            p_loss, text, image
        )

        def grad_one(acc, xs):
            mb, k, gt, gi = xs
            _, pullback = jax.vjp(
                lambda q: embed(merge_lora(stop_frozen(q)), mb, jax.random.fold_in(rng, k), deterministic), params
            )
            (g,) = pullback((gt, gi))
            return jax.tree.map(jnp.add, acc, g), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, _ = jax.lax.scan(grad_one, zeros, (micro, ks, g_text, g_image))
        grads = dict(grads)
        for k, g in g_loss.items():
            grads[k] = grads[k] + g
        return loss_value, grads

    return full_batch_grad if accum_steps == 1 else accumulated_grad


def make_train_step(
    model,
    tx,
    schedule,
    mesh: Mesh,
    state_shardings: TrainState,
    *,
    loss: str = "softmax",
    accum_steps: int = 1,
    freeze: str | None = None,
    deterministic: bool = False,
    rng_impl: str = "threefry",
    loss_impl: str = "gather",
    loss_chunk: int = 0,
    unfreeze_last_layers: dict | None = None,
    positives: str = "pair",
):
    """Returns ``step(state, batch) -> (state, metrics)``, jitted; ``state`` is donated.

    ``batch``: dict of global arrays sharded over ("data", "fsdp") (``sharding.shard_batch``),
    input_ids/attention_mask int32 (B, L), pixel_values uint8 (B, H, W, 3) images (the data
    pipeline's; normalised here, on the device: ``encoding.model_pixels``) or float32 (B, 3, H, W).
    ``metrics``: fp32 scalars ``loss``, ``logit_scale`` (before the update), ``lr``, ``grad_norm``.
    ``rng_impl``: the dropout bit generator (``RNG_IMPLS``; see ``dropout_key``).
    ``loss_impl`` / ``loss_chunk`` / ``positives``: see ``make_grad_fn``; with ``positives="label"``
    the batch also holds "label" int32 (B,) (``batch_keys``).
    Call it inside ``sharding.use_mesh_and_rules(mesh)`` so activation constraints apply.
    """
    grad_fn = make_grad_fn(
        model,
        mesh,
        loss=loss,
        accum_steps=accum_steps,
        freeze=freeze,
        deterministic=deterministic,
        rng_impl=rng_impl,
        loss_impl=loss_impl,
        loss_chunk=loss_chunk,
        unfreeze_last_layers=unfreeze_last_layers,
        positives=positives,
    )

    def step_fn(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        params = state.params
        loss_value, grads = grad_fn(params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        labels = trainable_labels(params, freeze, unfreeze_last_layers)
        new_params = optax.apply_updates(params, updates)
        # frozen params keep their exact bits
        new_params = dict(jax.tree.map(lambda n, o, lab: o if lab == "frozen" else n, new_params, params, labels))
        if labels["logit_scale"] == "trainable":
            new_params["logit_scale"] = clamp_logit_scale(new_params["logit_scale"])
        trained = [g for g, lab in zip(jax.tree.leaves(grads), jax.tree.leaves(labels)) if lab == "trainable"]
        metrics = {
            "loss": loss_value.astype(jnp.float32),
            "logit_scale": params["logit_scale"],
            "lr": jnp.asarray(schedule(state.step), jnp.float32),
            "grad_norm": optax.tree.norm(trained),
        }
        return TrainState(step=state.step + 1, params=new_params, opt_state=opt_state, rng=state.rng), metrics

    batch_shardings = {k: shd.batch_sharding(mesh) for k in batch_keys(positives)}
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )


def train_step_for(
    config, options, model, tx, schedule, mesh: Mesh, state_shardings: TrainState, *, freeze=None, unfreeze=None
):
    """The train step ``ccj-train`` runs for a trainer ``config`` whose "auto" keys ``options``
    resolved (``training.defaults.resolve_run_options``): the one place the loop and
    ``python -m bench.lower`` build it, so the lowered step is the trained one."""
    return make_train_step(
        model,
        tx,
        schedule,
        mesh,
        state_shardings,
        loss=config.loss,
        accum_steps=config.accum_steps,
        freeze=freeze,
        rng_impl=options.rng_impl,
        loss_impl=config.loss_impl,
        loss_chunk=config.loss_chunk,
        unfreeze_last_layers=unfreeze,
        positives=config.get("loss_positives", "pair"),
    )
