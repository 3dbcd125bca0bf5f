"""The fine-tuning stage (``config.stage = "finetune"``): LoRA or full fine-tuning of a trained
model, optionally DreamBooth with prior preservation, through the shared training loop.

The base model comes from ``config.finetune.base``: an ldm_jax model folder (``ldm_jax.json``,
the ``model/`` export of a diffusion run) or a local diffusers Stable Diffusion folder
(``model_index.json``), read by ``ldm_jax.pipeline.loading.read_model_folder``.

What is trained (``TrainState.params``, so also the EMA, the optimizer state and the
checkpoints) is only the adaptation, ``{"unet": ..., "text_encoder"?: ...}``:

* ``method="lora"``: LoRA factors (``ldm_jax.models.lora``; ``config.lora``), the U-Net's and,
  with ``train_conditioner``, the text encoder's. Adam's moments cover only the factors.
* ``method="full"``: a residual ``D`` of every weight, initialised to zero; the model runs
  at ``W_base + D``. Gradients and Adam updates are those of training ``W`` itself; decoupled
  weight decay pulls towards the base weights rather than towards zero (L2-SP).

The base weights are the loop's frozen tree (``Task.frozen_params["base"]``, with the first
stage and a frozen text encoder): boxed with the model's logical axis names, so the mesh
rules FSDP-shard them like trained params, and passed to the compiled step as an argument
(``Task.loss_takes_frozen``), never as constants. The loss merges adaptation and base
inside the step (``compose``) and differentiates with respect to the adaptation only.

Export (``<workdir>/<export.dirname>``, atomically by ``train.py``): ``method="lora"`` writes
``pytorch_lora_weights.safetensors`` (diffusers/peft keys with rank/alpha metadata: loads with
diffusers' ``load_lora_weights`` and ``sample.py --lora``), ``lora.json`` (base, rank, alpha,
targets) and, with ``export_merged``, ``merged/``, the base with the LoRA merged as an ldm_jax
model folder; ``method="full"`` writes the fine-tuned model folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.interop.lora_formats import save_lora
from ldm_jax.ldm.conditioning import check_guidance_setting
from ldm_jax.ldm.first_stage import LoadedFirstStage, box_like
from ldm_jax.ldm.model import DiffusionModel, params_fingerprint
from ldm_jax.ldm.sections import WEIGHTINGS, choice, compute_dtype, merge_section
from ldm_jax.models import lora as lora_lib
from ldm_jax.pipeline import LatentDiffusionPipeline, pipeline_from_model, save_model_folder
from ldm_jax.pipeline.loading import read_model_folder
from ldm_jax.training.context import start_run
from ldm_jax.training.loop import Task
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.training.stages.base import Stage
from ldm_jax.training.stages.dreambooth import PRIOR_PREFIX, DreamBoothSource, class_images
from ldm_jax.training.stages.diffusion import make_preview_fn, preview_conditions
from ldm_jax.training.stages.finetune_sections import (
    METHODS,
    dreambooth_defaults,
    finetune_defaults,
    lora_defaults,
)
from ldm_jax.training.stages.sections import diffusion_preview_defaults

log = logging.getLogger(__name__)


def _tree_bytes(tree) -> int:
    return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def _is_box(x) -> bool:
    return isinstance(x, nn.LogicallyPartitioned)


def _targets(value) -> Any:
    """A config's target list (tuple / list) or regular-expression string."""
    return str(value) if isinstance(value, str) else tuple(str(v) for v in value)


@dataclasses.dataclass(frozen=True)
class FineTune:
    """The base model, what is trained and how the trained tree composes with the base.

    ``base``: ``{"unet": boxed, <cond key>?: boxed}``: the base weights the loss reads;
    ``trained``: the component names that are adapted; ``scaling``: per component the LoRA's
    static per-layer scaling (``Lora.scaling``); ``boxed_init(key)``: the boxed initial
    trained tree (the loop's ``Task.init_params``)."""

    model: DiffusionModel
    method: str
    base: dict
    trained: tuple[str, ...]
    lora_configs: Mapping[str, lora_lib.LoraConfig]
    scaling: Mapping[str, tuple]
    pipeline_kwargs: Mapping[str, Any]

    def init_params(self, key):
        out = {}
        for i, name in enumerate(self.trained):
            boxed = self.base[name]
            if self.method == "full":
                out[name] = jax.tree.map(
                    lambda b: b.replace_boxed(jnp.zeros(b.value.shape, jnp.float32)) if _is_box(b)
                    else jnp.zeros(np.shape(b), jnp.float32),
                    boxed, is_leaf=_is_box,
                )
            else:
                lora = lora_lib.init_lora(jax.random.fold_in(key, i), nn.meta.unbox(boxed), self.lora_configs[name])
                out[name] = lora_lib.with_logical_axes(lora, boxed).factors
        return out

    def loras(self, trained) -> dict[str, lora_lib.Lora]:
        return {name: lora_lib.Lora(trained[name], self.scaling[name]) for name in self.trained}

    def compose(self, trained, base):
        """The model's params ``{"unet": ..., <cond key>?: ...}`` from the trained tree and
        the (unboxed) base weights: the LoRA merged in, or ``base + residual``."""
        out = {}
        for name, weights in base.items():
            if name not in self.trained:
                out[name] = weights
            elif self.method == "full":
                out[name] = jax.tree.map(lambda w, d: (jnp.asarray(w, jnp.float32) + d).astype(w.dtype), weights, trained[name])
            else:
                out[name] = lora_lib.merge(weights, lora_lib.Lora(trained[name], self.scaling[name]))
        return out

    def loss_fn(self, trained, batch, key, frozen):
        return self.model.loss_fn(self.compose(trained, frozen["base"]), batch, key)


def load_finetune(config: Any, resolution: int) -> FineTune:
    """The :class:`FineTune` of ``config.finetune`` / ``config.lora`` for data at ``resolution``."""
    ft = merge_section(finetune_defaults(), config.get("finetune"), "finetune")
    lc = merge_section(lora_defaults(), config.get("lora"), "lora")
    method = choice("config.finetune.method", ft.method, METHODS)
    weighting = choice("config.finetune.weighting", ft.weighting, WEIGHTINGS)
    if not ft.base:
        raise ValueError("config.finetune.base is not set (an ldm_jax model folder or a diffusers SD folder)")
    kwargs = read_model_folder(ft.base, dtype=compute_dtype(ft.dtype, "config.finetune.dtype"))
    if kwargs.get("concat") is not None:
        raise ValueError(f"fine-tuning a {kwargs['concat']!r} model (concatenated conditions) is not supported: {ft.base}")
    unet, fs_adapter, conditioner = kwargs["unet"], kwargs["first_stage"], kwargs["conditioner"]
    if float(ft.scale_factor) > 0:
        fs_adapter = fs_adapter.with_scale(float(ft.scale_factor))
    if resolution % fs_adapter.factor:
        raise ValueError(f"data resolution {resolution} is not divisible by the first stage's factor {fs_adapter.factor}")
    if conditioner.has_null:
        conditioner = dataclasses.replace(conditioner, drop_prob=float(ft.drop_prob))
    key = jax.random.key(0)
    unet_boxed = box_like(jax.eval_shape(unet.init, key, **unet.dummy_inputs(1))["params"], kwargs["unet_params"])
    cond_key = conditioner.params_key
    cond_boxed = None
    if cond_key is not None:
        cond_boxed = box_like(jax.eval_shape(conditioner.init_params, key), kwargs["conditioner_params"])
    in_loss = cond_key is not None and (conditioner.trainable or bool(ft.train_conditioner))
    if ft.train_conditioner and cond_key is None:
        raise ValueError(f"config.finetune.train_conditioner=True but the {conditioner.kind!r} base has no conditioner params")
    if ft.train_conditioner and method == "lora" and cond_key != "text_encoder":
        raise ValueError(f"LoRA on the conditioner needs a text encoder; this base has {cond_key!r} (use method='full')")
    variables = kwargs["first_stage_variables"]
    first_stage = LoadedFirstStage(
        fs_adapter, {} if variables is None else variables,
        {"source": "finetune_base", "path": os.path.abspath(str(ft.base)), "kind": fs_adapter.kind},
    )
    model = DiffusionModel(
        unet=unet,
        conditioner=conditioner,
        first_stage=first_stage,
        schedule_config=dict(kwargs["schedule"]),
        prediction=kwargs["prediction"],
        weighting=weighting,
        min_snr_gamma=float(ft.min_snr_gamma),
        sample_posterior=bool(ft.sample_posterior),
        latent_size=resolution // fs_adapter.factor,
        conditioner_frozen_params=None if in_loss else cond_boxed,
        conditioner_frozen=None if cond_key is None else not in_loss,
    )
    base = {"unet": unet_boxed}
    if in_loss:
        base[cond_key] = cond_boxed
    trained = ("unet",) + ((cond_key,) if ft.train_conditioner else ())
    lora_configs, scaling = {}, {}
    if method == "lora":
        alpha = float(lc.alpha) if float(lc.alpha) > 0 else None
        for name in trained:
            targets = lc.target_modules if name == "unet" else lc.conditioner_target_modules
            cfg = lora_lib.LoraConfig(int(lc.rank), alpha, _targets(targets), bool(lc.use_rslora))
            try:
                abstract = jax.eval_shape(lambda: lora_lib.init_lora(key, nn.meta.unbox(base[name]), cfg))
            except ValueError as error:
                raise ValueError(f"config.lora ({name}): {error}") from None
            lora_configs[name], scaling[name] = cfg, abstract.scaling
    return FineTune(model, method, base, trained, lora_configs, scaling, kwargs)


def optimizer_state_report(config: Any, finetune: FineTune) -> dict[str, int]:
    """Bytes of the optimizer state of this fine-tuning and of full fine-tuning of the same
    components (from shapes only), and of the trained tree."""
    tx, _ = make_optimizer(config.optimizer)
    trained = jax.eval_shape(lambda: nn.meta.unbox(finetune.init_params(jax.random.key(0))))
    full = {name: nn.meta.unbox(finetune.base[name]) for name in finetune.trained}
    full = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), full)
    return {
        "trained_params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(trained))),
        "trained_bytes": _tree_bytes(trained),
        "optimizer_state_bytes": lora_lib.optimizer_state_bytes(tx, trained),
        "full_finetune_optimizer_state_bytes": lora_lib.optimizer_state_bytes(tx, full),
    }


def _condition_of(model: DiffusionModel, prompt: str, label: int, what: str) -> dict:
    """The DreamBooth condition for the instance / class images: a prompt or a label."""
    kind = model.conditioner.kind
    if kind == "text":
        if not prompt:
            raise ValueError(f"config.dreambooth.{what}_prompt is empty (a text-conditioned base)")
        return {"prompts": str(prompt)}
    if kind == "class":
        if not 0 <= int(label) < int(model.conditioner.num_classes):
            raise ValueError(
                f"config.dreambooth.{what}_label={label} is not a class of the base (0..{model.conditioner.num_classes - 1})"
            )
        return {"class_labels": int(label)}
    raise ValueError("DreamBooth needs a text- or class-conditioned base model")


def _host_condition(model: DiffusionModel, condition: Mapping[str, Any], n: int) -> dict:
    c = model.conditioner
    if "prompts" in condition:
        return c.host_inputs([condition["prompts"]] * n)
    return c.host_inputs([condition["class_labels"]] * n)


def build_stage(config: Any, data_stats: Any, *, source: Any = None, run: Any = None) -> Stage:
    """The fine-tuning stage (see the module docstring). ``source``: the training data
    (``config.data``; the instance images for DreamBooth)."""
    run = start_run(config) if run is None else run
    db = merge_section(dreambooth_defaults(), config.get("dreambooth"), "dreambooth")
    preview_config = merge_section(diffusion_preview_defaults(), config.get("preview"), "preview")
    resolution = int(data_stats.resolution)
    finetune = load_finetune(config, resolution)
    model = finetune.model
    c = model.conditioner
    check_guidance_setting(preview_config.get("guidance_interval", ()), c, "config.preview")
    if int(data_stats.channels) != model.first_stage.adapter.image_channels:
        raise ValueError(
            f"the base's first stage takes {model.first_stage.adapter.image_channels}-channel images but the data has "
            f"{data_stats.channels} (set config.data.channels)"
        )
    report = optimizer_state_report(config, finetune)
    log.info(
        "finetune (%s): %d trained params; optimizer state %.3g MB (full fine-tuning: %.3g MB)",
        finetune.method, report["trained_params"], report["optimizer_state_bytes"] / 1e6,
        report["full_finetune_optimizer_state_bytes"] / 1e6,
    )

    data_source = None
    instance = prior = None
    prior_weight = float(db.prior_loss_weight)
    if db.enabled:
        if prior_weight < 0:
            raise ValueError(f"config.dreambooth.prior_loss_weight must be >= 0, got {prior_weight}")
        instance = _condition_of(model, db.instance_prompt, db.instance_label, "instance")
        images = None
        if prior_weight > 0:
            prior = _condition_of(model, db.class_prompt, db.class_label, "class")
            pipe = LatentDiffusionPipeline(**finetune.pipeline_kwargs, devices=jax.local_devices())
            class_dir = str(db.class_dir) or os.path.join(str(config.get("workdir") or "."), "class_images")
            images = class_images(
                pipe, prior, int(db.num_class_images), resolution, db, class_dir, write=jax.process_index() == 0
            )
        if source is None:
            from ldm_jax.data import build_dataset

            source = build_dataset(config.data)
        data_source = DreamBoothSource(source, images)
    elif c.kind == "class" and data_stats.num_classes is None:
        raise ValueError("the base is class-conditional but config.data has no labels (or use config.dreambooth)")
    elif c.kind == "text" and not data_stats.has_captions:
        raise ValueError("the base is text-conditioned but config.data has no captions (or use config.dreambooth)")

    def host_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = {"image": np.asarray(batch["image"], np.float32)}
        n = len(out["image"])
        if instance is not None:
            out.update(_host_condition(model, instance, n))
            if prior is not None:
                out[PRIOR_PREFIX + "image"] = np.asarray(batch[PRIOR_PREFIX + "image"], np.float32)
                out.update({PRIOR_PREFIX + k: v for k, v in _host_condition(model, prior, n).items()})
        elif c.kind == "class":
            out.update(c.host_inputs(batch["label"]))
        elif c.kind == "text":
            out.update(c.host_inputs(batch["caption"]))
        return out

    def prepare_batch(frozen, batch, key):
        # DreamBooth: instances then class images in one batch, weighted so that the mean loss
        # is instance mean + prior_loss_weight * prior mean.
        batch = dict(batch)
        prior_keys = [k for k in batch if k.startswith(PRIOR_PREFIX)]
        n = batch["image"].shape[0]
        for k in prior_keys:
            name = k[len(PRIOR_PREFIX):]
            batch[name] = jnp.concatenate([batch[name], batch.pop(k)])
        out = model.prepare_batch(frozen, batch, key)
        if prior_keys:
            out["loss_weight"] = jnp.concatenate([jnp.full((n,), 2.0), jnp.full((n,), 2.0 * prior_weight)])
        return out

    frozen = {**model.frozen_params(), "base": finetune.base}
    task = Task(
        init_params=finetune.init_params,
        loss_fn=finetune.loss_fn,
        frozen_params=frozen,
        prepare_batch=prepare_batch,
        loss_takes_frozen=True,
    )

    if instance is not None and not preview_config.prompts and c.kind == "text":
        preview_config.prompts = [instance["prompts"]] + ([prior["prompts"]] if prior else [])
    cond, uncond, n, rows = preview_conditions(model, preview_config, source)
    frozen_placed, _ = run.place_replicated(frozen)
    preview_fn = make_preview_fn(
        model, preview_config, frozen_placed, cond, uncond, n, run.replicated,
        compose=lambda trained, fz: finetune.compose(trained, fz["base"]),
    )

    base_host = None

    def export(trained, directory):
        nonlocal base_host
        if base_host is None:
            base_host = jax.device_get(nn.meta.unbox(finetune.base))
        merged = jax.device_get(finetune.compose(trained, base_host))
        provenance = {"workdir": str(config.get("workdir") or ""), "base": os.path.abspath(str(finetune_base)),
                      "method": finetune.method}
        if finetune.method == "full":
            save_model_folder(pipeline_from_model(model, merged), directory, overwrite=True, provenance=provenance)
            return
        save_lora(directory, finetune.loras(trained))
        with open(os.path.join(directory, "lora.json"), "w", encoding="utf-8") as f:
            json.dump({**provenance, "components": {
                name: {"rank": cfg.rank, "alpha": cfg.alpha if cfg.alpha is not None else cfg.rank,
                       "use_rslora": cfg.use_rslora, "target_modules": cfg.target_modules}
                for name, cfg in finetune.lora_configs.items()}}, f, indent=2, sort_keys=True, default=list)
        if bool(merge_section(finetune_defaults(), config.get("finetune"), "finetune").export_merged):
            save_model_folder(pipeline_from_model(model, merged), os.path.join(directory, "merged"),
                              overwrite=True, provenance=provenance)

    finetune_base = str(config.finetune.base)
    metadata = {
        "stage": "finetune",
        "method": finetune.method,
        "base": os.path.abspath(finetune_base),
        "base_params_hash": params_fingerprint(finetune.base),
        "scale_factor": float(model.first_stage.scale_factor),
        "dreambooth": bool(db.enabled),
        **report,
    }
    return Stage(
        task=task,
        host_batch=host_batch,
        preview=preview_fn,
        export=export,
        metadata=metadata,
        data_source=data_source,
        preview_columns=max(1, int(preview_config.columns)) if c.has_null else 0,
        preview_rows=tuple(rows),
        model=finetune,
    )
