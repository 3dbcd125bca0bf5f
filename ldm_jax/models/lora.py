"""LoRA (low-rank adaptation) as a transformation of a parameter tree.

No module is forked or wrapped: a :class:`Lora` holds, for each targeted layer of some base
param tree (a ``UNet``'s, a ``CLIPTextEncoder``'s), two factors, and :func:`merge` returns the
base tree with ``W' = W + scaling * scale * A B`` on those layers. The same model's ``apply``
then runs the adapted network. Training differentiates through :func:`merge` with respect to
the factors only (:func:`lora_loss`), so the base weights are frozen by construction and the
optimizer state covers only the factors.

Layouts (flax; the transposes of peft's torch ``lora_A`` / ``lora_B`` weights):
  Dense kernel [in, out]          -> lora_A [in, r],          lora_B [r, out]
  Conv kernel  [kh, kw, in, out]  -> lora_A [kh, kw, in, r],  lora_B [1, 1, r, out]
The conv case is peft's: A is a conv with the base layer's kernel, stride and padding, B a 1x1
conv, and the merged delta is ``delta[h, w, i, o] = sum_r A[h, w, i, r] B[r, o]``.

``scaling`` is per layer (``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA) and static: it is
pytree metadata of :class:`Lora`, not a leaf, so it is neither trained nor in optimizer state.

Target modules are given like peft's ``target_modules``: a sequence of module names, each
matching a layer whose path ends with it (``"to_q"``, ``"to_out.0"``, ``"ff.net.0.proj"``; a
dotted diffusers name and the flax path ``to_out_0`` / ``ff/net_0/proj`` are the same), or one
regular expression string that must match the whole ``/``-joined flax path.

Example::

    lora = init_lora(jax.random.PRNGKey(0), unet_params, LoraConfig(rank=4, alpha=4))
    loss = lora_loss(diffusion_loss)          # loss(lora, base_params, batch, key)
    opt_state = optax.adamw(1e-4).init(lora)  # only the factors
    eps = unet.apply({"params": merge(unet_params, lora)}, x, t, context)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Mapping, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct, traverse_util

LORA_A = "lora_A"
LORA_B = "lora_B"
RANK_AXIS = "lora_rank"  # logical axis name of the rank dimension (small: leave it unsharded)

# Presets (peft / diffusers spelling). diffusers' LoRA training scripts target the attention
# projections of the U-Net and the text encoder's self-attention.
UNET_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FEED_FORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")
UNET_CONV_TARGETS = (
    "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "time_emb_proj",
    "downsamplers.0.conv", "upsamplers.0.conv",
)
TEXT_ENCODER_ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_ENCODER_MLP_TARGETS = ("fc1", "fc2")

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how strongly. ``alpha=None`` means ``alpha = rank`` (scaling 1)."""

    rank: int = 4
    alpha: float | None = None
    target_modules: Union[Sequence[str], str] = UNET_ATTENTION_TARGETS
    use_rslora: bool = False

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {self.rank!r}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.target_modules, str) and not self.target_modules:
            raise ValueError("target_modules must not be empty")

    @property
    def scaling(self) -> float:
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@struct.dataclass
class Lora:
    """LoRA factors for one param tree: ``factors`` mirrors the base tree down to each adapted
    layer, which holds ``{"lora_A": ..., "lora_B": ...}``; ``scaling`` is the static
    ``(("/"-joined layer path, alpha / r), ...)``, sorted."""

    factors: dict
    scaling: tuple = struct.field(pytree_node=False, default=())

    @property
    def layers(self) -> dict[Path, dict]:
        """``{layer path: {"lora_A": a, "lora_B": b}}``."""
        flat = traverse_util.flatten_dict(self.factors)
        out: dict[Path, dict] = {}
        for path, value in flat.items():
            out.setdefault(path[:-1], {})[path[-1]] = value
        return out

    def scaling_of(self, path: Path) -> float:
        return dict(self.scaling)["/".join(path)]

    @property
    def num_params(self) -> int:
        return sum(math.prod(x.shape) for x in jax.tree.leaves(self.factors))


def make_lora(layers: Mapping[Path, tuple[Any, Any, float]]) -> Lora:
    """A :class:`Lora` from ``{layer path: (lora_A, lora_B, scaling)}`` (flax layouts)."""
    factors, scaling = {}, []
    for path, (a, b, s) in layers.items():
        path = tuple(path)
        if a.ndim != b.ndim or a.ndim not in (2, 4) or a.shape[-1] != b.shape[-2]:
            raise ValueError(
                f"LoRA factors of {'/'.join(path)} have shapes {a.shape} and {b.shape}: expected "
                "[in, r] and [r, out] (dense) or [kh, kw, in, r] and [1, 1, r, out] (conv)"
            )
        factors[path + (LORA_A,)] = a
        factors[path + (LORA_B,)] = b
        scaling.append(("/".join(path), float(s)))
    return Lora(traverse_util.unflatten_dict(factors), tuple(sorted(scaling)))


# ----------------------------------------------------------------------------- targets


def _name_to_path_suffix(name: str) -> str:
    """peft/diffusers dotted module name -> the "/"-joined flax path it ends as: list indices
    (``.0``) are written ``_0`` in flax (``to_out.0`` -> ``to_out_0``), other dots are nesting."""
    return re.sub(r"\.(\d+)(?=\.|$)", r"_\1", name).replace(".", "/")


def adaptable_layers(params) -> dict[Path, tuple[int, ...]]:
    """``{layer path: kernel shape}`` for every Dense (2-D kernel) and Conv (4-D kernel) layer."""
    params = nn.meta.unbox(params)
    out = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[-1] == "kernel" and len(leaf.shape) in (2, 4):
            out[path[:-1]] = tuple(leaf.shape)
    return out


def match_targets(params, target_modules: Union[Sequence[str], str]) -> list[Path]:
    """Layer paths of ``params`` selected by ``target_modules`` (see module docstring);
    ValueError when nothing matches."""
    layers = adaptable_layers(params)
    if isinstance(target_modules, str):
        rx = re.compile(target_modules)
        hits = [p for p in layers if rx.fullmatch("/".join(p))]
    else:
        suffixes = [_name_to_path_suffix(n) for n in target_modules]
        hits = [
            p for p in layers
            if any("/".join(p) == s or "/".join(p).endswith("/" + s) for s in suffixes)
        ]
    if not hits:
        raise ValueError(f"target_modules={target_modules!r} match no Dense/Conv layer of the param tree")
    return sorted(hits)


def init_lora(key: jax.Array, params, config: LoraConfig, dtype=jnp.float32) -> Lora:
    """Fresh LoRA factors as peft initialises them: A kaiming-uniform (``a = sqrt(5)``, i.e.
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = in * kh * kw), B zeros, so the adapted
    model starts equal to the base model."""
    layers = adaptable_layers(params)
    targets = match_targets(params, config.target_modules)
    shapes = tuple(layers[p] for p in targets)
    a_list, b_list = _init_factors(key, shapes, config.rank, jnp.dtype(dtype))
    out = {p: (a, b, config.scaling) for p, a, b in zip(targets, a_list, b_list)}
    return make_lora(out)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_factors(key, shapes, rank, dtype):
    # One uniform draw sliced per layer: a single small program (one random call per layer
    # makes XLA compile a threefry per layer, which takes tens of seconds for a U-Net).
    sizes = [math.prod(s[:-1]) * rank for s in shapes]
    u = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    a_list, b_list, offset = [], [], 0
    for shape, size in zip(shapes, sizes):
        bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
        a_list.append((bound * u[offset:offset + size]).reshape(shape[:-1] + (rank,)).astype(dtype))
        offset += size
        b_shape = (rank, shape[-1]) if len(shape) == 2 else (1, 1, rank, shape[-1])
        b_list.append(jnp.zeros(b_shape, dtype))
    return a_list, b_list


# ----------------------------------------------------------------------------- merge


def delta_weight(lora_a, lora_b, scaling) -> jax.Array:
    """``scaling * A B`` in the base kernel's layout ([in, out] or [kh, kw, in, out]), float32."""
    a = jnp.asarray(lora_a, jnp.float32)
    b = jnp.asarray(lora_b, jnp.float32)
    b = b.reshape(b.shape[-2:])  # a conv B is [1, 1, r, out]
    return scaling * jnp.einsum("...ir,ro->...io", a, b)


def _as_weighted(loras) -> list[tuple[Lora, Any]]:
    if isinstance(loras, Lora):
        return [(loras, 1.0)]
    out = []
    for item in loras:
        if isinstance(item, Lora):
            out.append((item, 1.0))
        else:
            lora, scale = item
            out.append((lora, scale))
    return out


def _apply(params, loras, sign: float):
    boxed_in = any(isinstance(x, nn.meta.AxisMetadata) for x in jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)))
    if boxed_in:
        raise ValueError("merge/unmerge take unboxed params (nn.meta.unbox(params))")
    flat = dict(traverse_util.flatten_dict(params))
    deltas: dict[Path, jax.Array] = {}
    for lora, scale in _as_weighted(loras):
        for path, f in lora.layers.items():
            kpath = path + ("kernel",)
            if kpath not in flat:
                raise ValueError(f"LoRA layer {'/'.join(path)} is not a layer of the param tree")
            d = delta_weight(f[LORA_A], f[LORA_B], lora.scaling_of(path)) * scale
            if d.shape != flat[kpath].shape:
                raise ValueError(
                    f"LoRA delta of {'/'.join(path)} has shape {d.shape}, the kernel {flat[kpath].shape}"
                )
            deltas[kpath] = deltas[kpath] + d if kpath in deltas else d
    for kpath, d in deltas.items():
        w = flat[kpath]
        flat[kpath] = (jnp.asarray(w, jnp.float32) + sign * d).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def merge(params, loras):
    """Base params with every LoRA added: ``loras`` is a :class:`Lora`, or a sequence of
    ``Lora`` / ``(Lora, scale)``; each layer gets ``W + sum_i scale_i * scaling_i * A_i B_i``
    (summed in float32, cast back to the kernel's dtype). Pure and jit-able; gradients flow to
    the factors (and ``scale`` when it is an array)."""
    return _apply(params, loras, +1.0)


def unmerge(params, loras):
    """The inverse of :func:`merge` with the same ``loras`` and scales (exact up to rounding)."""
    return _apply(params, loras, -1.0)


# ----------------------------------------------------------------------------- training


def lora_loss(loss_fn: Callable[..., Any]) -> Callable[..., Any]:
    """``loss_fn(params, *args, **kw)`` -> ``loss(lora, base_params, *args, **kw)`` evaluated at
    ``merge(base_params, lora)``. ``jax.grad`` of it (argument 0) is a :class:`Lora` of factor
    gradients; the base params are an argument (not closed over, so jit does not embed them
    as constants) and receive no gradient."""

    def loss(lora: Lora, base_params, *args, **kwargs):
        return loss_fn(merge(jax.lax.stop_gradient(base_params), lora), *args, **kwargs)

    return loss


def frozen_base_labels(tree: Mapping[str, Any], trainable: str = "lora") -> dict:
    """Labels for ``optax.multi_transform`` over a combined tree ``{"base": ..., "lora": ...}``:
    every leaf under ``trainable`` is ``"train"``, every other leaf ``"freeze"``."""
    return {k: jax.tree.map(lambda _: "train" if k == trainable else "freeze", v) for k, v in tree.items()}


def frozen_base_optimizer(tx: optax.GradientTransformation, trainable: str = "lora") -> optax.GradientTransformation:
    """``tx`` on the ``trainable`` subtree of ``{"base": ..., "lora": ...}`` and zero updates (no
    state) on the rest: for trainers that keep one params tree."""
    return optax.multi_transform(
        {"train": tx, "freeze": optax.set_to_zero()}, lambda tree: frozen_base_labels(tree, trainable)
    )


def optimizer_state_bytes(tx: optax.GradientTransformation, params) -> int:
    """Bytes of ``tx.init(params)`` from ``jax.eval_shape`` (nothing allocated)."""
    state = jax.eval_shape(tx.init, params)
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))


def with_logical_axes(lora: Lora, boxed_params) -> Lora:
    """``lora`` with each factor boxed in ``nn.LogicallyPartitioned`` (for the training mesh
    rules): A takes the base kernel's input-side names plus ``lora_rank``, B ``lora_rank`` plus
    its output name, so an FSDP-sharded base shards its LoRA the same way."""
    names = {}
    for path, leaf in traverse_util.flatten_dict(boxed_params).items():
        if path[-1] == "kernel" and isinstance(leaf, nn.LogicallyPartitioned):
            names[path[:-1]] = tuple(leaf.names)
    flat = {}
    for path, f in lora.layers.items():
        kn = names.get(path)
        a, b = f[LORA_A], f[LORA_B]
        if kn is None:
            flat[path + (LORA_A,)], flat[path + (LORA_B,)] = a, b
            continue
        a_names = kn[:-1] + (RANK_AXIS,)
        b_names = (None,) * (b.ndim - 2) + (RANK_AXIS, kn[-1])
        flat[path + (LORA_A,)] = nn.LogicallyPartitioned(a, a_names)
        flat[path + (LORA_B,)] = nn.LogicallyPartitioned(b, b_names)
    return lora.replace(factors=traverse_util.unflatten_dict(flat))
