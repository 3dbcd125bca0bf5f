"""The train state and its sharded creation.

``TrainState`` holds only arrays (no apply_fn / tx), so the same tree is the jit argument,
the checkpoint item and the target of ``out_shardings``; the optimizer and the loss are
bound into the step by ``ldm_jax.training.step``.

Creation never materialises the whole state on one device: ``jax.eval_shape`` gives the
abstract state with logical names, the rules turn those into NamedShardings, and the init
itself is ``jax.jit(..., out_shardings=...)`` so each device computes only its shards.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from ldm_jax.training import mesh as mesh_lib

# key -> params tree, possibly boxed in nn.LogicallyPartitioned (``model.init(...)["params"]``).
InitParamsFn = Callable[[jax.Array], Any]


@flax.struct.dataclass
class TrainState:
    """step: int32 [] (optimizer updates done); params, ema_params: float32 trees;
    opt_state: optax state; rng: uint32 key data of the run's base key (per-step keys are
    ``fold_in(base, step)``, see ``step_key``). Tasks with non-trainable model state get a
    :class:`StatefulTrainState`."""

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array


@flax.struct.dataclass
class StatefulTrainState(TrainState):
    """A TrainState plus ``model_state``: non-trainable state the loss updates itself (e.g. a VQ
    EMA codebook's statistics). A separate class, so the state of every other task (its tree,
    checkpoints and manifests) stays exactly what it was."""

    model_state: Any


def model_state_of(state: TrainState) -> Any:
    """``state.model_state``, or None for a plain TrainState."""
    return getattr(state, "model_state", None)


# key -> tree of arrays (the initial non-trainable model state), from the same key as the params.
InitModelStateFn = Callable[[jax.Array], Any]


def _init_state(
    init_params: InitParamsFn, tx: optax.GradientTransformation, seed: int,
    init_model_state: InitModelStateFn | None = None, *init_args, loaded: Any = None,
) -> TrainState:
    base = jax.random.key(seed)
    params_key, run_key = jax.random.split(base)
    # init_args: arrays the init reads as arguments (a frozen U-Net a ControlNet copies).
    params = nn.unbox(init_params(params_key, *init_args))
    if loaded is not None:
        # Pretrained entries replace the init's (same keys, shapes and dtypes: checked by the
        # caller); their random init is then dead code, which XLA drops from the program.
        params = {**params, **loaded}
    fields = {}
    if init_model_state is not None:
        fields["model_state"] = nn.unbox(init_model_state(params_key))
    return (TrainState if init_model_state is None else StatefulTrainState)(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        # A real copy: ema_params and params are donated separately by the train step.
        ema_params=jax.tree.map(jnp.copy, params),
        rng=jax.random.key_data(run_key),
        **fields,
    )


def state_shardings(
    init_params: InitParamsFn,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: mesh_lib.LogicalRules,
    seed: int = 0,
    init_model_state: InitModelStateFn | None = None,
    init_args: tuple = (),
) -> tuple[TrainState, TrainState]:
    """``(abstract_state, shardings)``: ShapeDtypeStructs of the state and a TrainState of
    NamedShardings. Params and EMA follow the logical rules; optimizer-state copies of the
    params get their param's sharding; scalars, the key and the model state are replicated.
    ``init_args``: extra arguments of ``init_params`` (after the key)."""
    boxed = jax.eval_shape(init_params, jax.random.key(seed), *init_args)
    abstract_params = nn.unbox(boxed)
    p_shardings = mesh_lib.param_shardings(boxed, mesh, rules)
    abstract_state = jax.eval_shape(
        functools.partial(_init_state, init_params, tx, seed, init_model_state), *init_args
    )
    replicated = mesh_lib.replicated(mesh)
    fields = {}
    if init_model_state is not None:
        fields["model_state"] = jax.tree.map(lambda _: replicated, abstract_state.model_state)
    shardings = type(abstract_state)(
        step=replicated,
        params=p_shardings,
        opt_state=mesh_lib.mirror_param_shardings(abstract_state.opt_state, abstract_params, p_shardings, mesh),
        ema_params=p_shardings,
        rng=replicated,
        **fields,
    )
    return abstract_state, shardings


def create_sharded_state(
    init_params: InitParamsFn, tx: optax.GradientTransformation, shardings: TrainState, seed: int,
    init_model_state: InitModelStateFn | None = None,
    init_args: tuple = (),
    loaded: dict | None = None,
) -> TrainState:
    """The initial state, computed in place on the devices with ``shardings``.

    ``seed`` is a Python int baked into the program, so every process of a multi-host run
    builds the same state without exchanging host data. ``init_args`` (placed arrays, e.g. a
    frozen U-Net) are arguments of the init program, never constants in it.

    ``loaded``: ``{top-level params key: tree}`` of pretrained arrays, already placed with
    the params' shardings, that replace those entries of the init (fine-tuning); the EMA starts
    as a copy of them. They are donated: the state's params may reuse their buffers, so the
    caller must not read them afterwards."""
    fn = functools.partial(_init_state, init_params, tx, seed, init_model_state)
    if loaded is None:
        return jax.jit(fn, out_shardings=shardings)(*init_args)
    init = jax.jit(lambda loaded, *args: fn(*args, loaded=loaded), out_shardings=shardings, donate_argnums=0)
    return init(loaded, *init_args)


def abstract_with_shardings(abstract_state: TrainState, shardings: TrainState) -> TrainState:
    """ShapeDtypeStructs carrying shardings: the restore target for a checkpoint."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


def step_key(rng: jax.Array, step: Any) -> jax.Array:
    """The PRNG key of update ``step``: ``fold_in(base, step)``. Depends only on the base key
    and the step, so a resumed run draws the same noise as an uninterrupted one."""
    return jax.random.fold_in(jax.random.wrap_key_data(rng), step)
