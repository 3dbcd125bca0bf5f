"""A model-agnostic train step and its compiled, sharded form.

The model enters only through ``loss_fn(params, batch, key) -> (loss, aux)``, where ``loss``
is a float32 scalar averaged over the examples of ``batch`` and ``aux`` a dict of float32
scalars averaged the same way. A ``StatefulTrainState`` (with ``model_state``: non-trainable state the
model updates itself, e.g. a VQ EMA codebook) calls ``loss_fn(params, model_state, batch, key) ->
(loss, (aux, new_model_state))`` instead. Everything else (microbatching, clipping, AdamW, EMA,
non-finite guard, metrics) is here, written once.

Gradient accumulation is a ``lax.scan`` over ``num_microbatches`` slices of the batch inside
one step: one call = one optimizer update, so the optimizer count, the lr schedule, the EMA
warmup and the checkpoint step all count the same thing (unlike ``optax.MultiSteps``, whose
inner count runs k times faster than the updates). Microbatch ``i`` holds rows
``i, i + k, i + 2k, ...`` of the global batch: each device's rows split evenly among the
microbatches, so slicing moves no data between devices. Microbatch ``i`` gets the key
``fold_in(key, i)``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.defaults import EMA_DEFAULTS
from ldm_jax.training.train_state import TrainState, model_state_of

LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
StepFn = Callable[[TrainState, Any, jax.Array], tuple[TrainState, dict[str, jax.Array]]]


def ema_decay_at(num_updates: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """EMA decay after ``num_updates`` updates (>= 1). With warmup it is
    ``min(decay, (1 + n) / (10 + n))`` (the LDM/LitEma ramp) so early EMA weights are not
    dominated by the random init."""
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    n = num_updates.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def split_microbatches(batch: Any, num_microbatches: int) -> Any:
    """[B, ...] leaves -> [k, B / k, ...]; microbatch ``i`` is rows ``i::k``."""

    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(
                f"batch leaf with leading size {x.shape[0]} is not divisible into {num_microbatches} microbatches"
            )
        x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def _constrain(tree: Any, shardings: Any) -> Any:
    if shardings is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, shardings)


def train_step(
    state: TrainState,
    batch: Any,
    key: jax.Array,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    lr_schedule: Callable[[Any], Any],
    num_microbatches: int = 1,
    ema_decay: float = 0.9999,
    ema_warmup: bool = True,
    microbatch_sharding: NamedSharding | None = None,
    grad_shardings: Any = None,
    loss_takes_step: bool = False,
    frozen: Any = None,
    loss_takes_frozen: bool = False,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on ``batch`` (a tree of [B, ...] arrays).

    With ``loss_takes_frozen`` the loss is ``loss_fn(params, batch, key, frozen)`` (before a
    ``step`` argument): a frozen network the loss runs (the U-Net under a ControlNet or a
    LoRA), passed to the jitted step as an argument, so it is neither trained nor compiled in.

    Returns the new state and replicated float32 metrics: ``loss`` and every ``aux`` entry
    (means over the global batch), ``grad_norm`` (global norm before clipping), ``lr`` (the
    rate of this update), ``ema_decay`` and ``finite`` (1.0, or 0.0 when the loss or the
    gradient was NaN/inf, in which case the returned state is the input state unchanged).
    """
    stateful = model_state_of(state) is not None
    if loss_takes_frozen or frozen is not None:
        if stateful:
            raise ValueError("a loss with model state cannot also take frozen params (loss_takes_frozen)")
        frozen_loss_fn = loss_fn
        loss_fn = lambda params, batch, key, *step: frozen_loss_fn(params, batch, key, frozen, *step)  # noqa: E731
    if loss_takes_step:
        # Losses with a schedule of their own (e.g. the discriminator starting at step N) see
        # the number of updates done so far, as a traced scalar.
        step_loss_fn = loss_fn
        loss_fn = lambda *args: step_loss_fn(*args, state.step)  # noqa: E731
    if stateful:
        # loss_fn(params, model_state, batch, key) -> (loss, (aux, new model_state)); the
        # model state is no gradient input and, with microbatches, is threaded through them
        # in order (microbatch i + 1 sees the state microbatch i left).
        core = jax.value_and_grad(loss_fn, has_aux=True)
    else:
        plain = jax.value_and_grad(loss_fn, has_aux=True)

        def core(params, model_state, batch, key):
            (loss, aux), grads = plain(params, batch, key)
            return (loss, (aux, model_state)), grads

    def grad_fn(params, model_state, batch, key):
        (loss, (aux, model_state)), grads = core(params, model_state, batch, key)
        return loss, aux, model_state, grads

    model_state = model_state_of(state)
    if num_microbatches == 1:
        loss, aux, model_state, grads = grad_fn(state.params, model_state, batch, key)
    else:
        microbatches = split_microbatches(batch, num_microbatches)

        def accumulate(carry, inputs):
            grad_sum, loss_sum, aux_sum, model_state = carry
            index, microbatch = inputs
            microbatch = _constrain(microbatch, microbatch_sharding)
            loss, aux, model_state, grads = grad_fn(
                state.params, model_state, microbatch, jax.random.fold_in(key, index)
            )
            grad_sum = _constrain(jax.tree.map(jnp.add, grad_sum, grads), grad_shardings)
            aux_sum = jax.tree.map(jnp.add, aux_sum, aux)
            return (grad_sum, loss_sum + loss.astype(jnp.float32), aux_sum, model_state), None

        # The aux structure comes from an abstract evaluation, so loss_fn stays free to return any dict.
        aux_shape = jax.eval_shape(
            lambda: grad_fn(state.params, model_state, jax.tree.map(lambda x: x[0], microbatches), key)[1]
        )
        init = (
            _constrain(jax.tree.map(jnp.zeros_like, state.params), grad_shardings),
            jnp.zeros((), jnp.float32),
            jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), aux_shape),
            model_state,
        )
        (grad_sum, loss_sum, aux_sum, model_state), _ = jax.lax.scan(
            accumulate, init, (jnp.arange(num_microbatches), microbatches)
        )
        scale = 1.0 / num_microbatches
        grads = jax.tree.map(lambda g: g * scale, grad_sum)
        loss = loss_sum * scale
        aux = jax.tree.map(lambda a: a * scale, aux_sum)

    grads = _constrain(grads, grad_shardings)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step + 1, ema_decay, ema_warmup)
    ema_params = jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p, state.ema_params, params)
    updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
    if stateful:
        updated = updated.replace(model_state=model_state)

    # A NaN/inf update would poison params, Adam moments and EMA at once; keep the old state
    # and let the loop stop with the last good checkpoint intact.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)

    metrics = {
        "loss": loss.astype(jnp.float32),
        "grad_norm": grad_norm.astype(jnp.float32),
        "lr": jnp.asarray(lr_schedule(state.step), jnp.float32),
        "ema_decay": decay,
        "finite": finite.astype(jnp.float32),
    }
    for name, value in aux.items():
        metrics[name] = jnp.asarray(value, jnp.float32)
    return new_state, metrics


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    lr_schedule: Callable[[Any], Any],
    train_config: Mapping[str, Any],
    ema_config: Mapping[str, Any],
    *,
    mesh: Mesh | None = None,
    state_shardings: TrainState | None = None,
    loss_takes_step: bool = False,
    loss_takes_frozen: bool = False,
) -> StepFn:
    """``train_step`` with its static pieces bound: a pure ``(state, batch, key) -> (state,
    metrics)``. With ``mesh``/``state_shardings`` the microbatches and gradient accumulators
    are constrained to the batch/param shardings (FSDP then reduce-scatters gradients)."""
    ema_config = {**EMA_DEFAULTS, **dict(ema_config)}
    num_microbatches = int(train_config.get("num_microbatches", 1))
    if num_microbatches < 1:
        raise ValueError(f"config.train.num_microbatches must be >= 1, got {num_microbatches}")
    return functools.partial(
        train_step,
        loss_fn=loss_fn,
        tx=tx,
        lr_schedule=lr_schedule,
        num_microbatches=num_microbatches,
        ema_decay=float(ema_config["decay"]),
        ema_warmup=bool(ema_config["warmup"]),
        microbatch_sharding=mesh_lib.batch_sharding(mesh) if mesh is not None else None,
        grad_shardings=state_shardings.params if state_shardings is not None else None,
        loss_takes_step=loss_takes_step,
        loss_takes_frozen=loss_takes_frozen,
    )


def compile_train_step(
    step_fn: StepFn, state_shardings: TrainState, mesh: Mesh, frozen_shardings: Any = None
) -> StepFn:
    """``jax.jit`` of ``step_fn`` with explicit shardings: state as ``state_shardings`` (and
    donated, so the update happens in place), batch split over the data axes, key and
    metrics replicated. ``frozen_shardings``: the step takes a fourth argument, the frozen
    params (``frozen=``), sharded so (not donated)."""
    replicated = mesh_lib.replicated(mesh)

    @functools.wraps(step_fn)
    def step_in_mesh(state, batch, key, *frozen):
        # The mesh in context while the step traces, so mesh-aware kernels (the splash attention
        # backend's shard_map) see it via jax.sharding.get_abstract_mesh(). Only the abstract
        # mesh, and only inside the trace: jax.set_mesh around the loop would also commit every
        # array created under it to the mesh, which jit's explicit in_shardings then refuse.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            if frozen:
                return step_fn(state, batch, key, frozen=frozen[0])
            return step_fn(state, batch, key)

    if frozen_shardings is not None:
        return jax.jit(
            step_in_mesh,
            in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh), replicated, frozen_shardings),
            out_shardings=(state_shardings, replicated),
            donate_argnums=(0,),
        )
    return jax.jit(
        step_in_mesh,
        in_shardings=(state_shardings, mesh_lib.batch_sharding(mesh), replicated),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),
    )
