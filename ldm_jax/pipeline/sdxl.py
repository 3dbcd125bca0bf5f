"""SDXL in the pipeline: the request options of the micro-conditioning (with diffusers'
defaults), and the base -> refiner hand-off.

An SDXL diffusers folder (``StableDiffusionXLPipeline``: base; ``StableDiffusionXLImg2ImgPipeline``
with ``requires_aesthetics_score``: refiner) loads into the ordinary
:class:`~ldm_jax.pipeline.LatentDiffusionPipeline` with an
:class:`~ldm_jax.ldm.conditioning.SDXLConditioner`; generation is the one program of
:mod:`ldm_jax.ldm.generation`. Defaults, as diffusers' SDXL pipelines:

* ``original_size`` = ``target_size`` = the output (height, width); ``crops_coords_top_left`` (0, 0);
* the unconditional branch: zeros without a negative prompt (``force_zeros_for_empty_prompt``);
* its time ids: text-to-image - the positive ones unless both ``negative_original_size`` and
  ``negative_target_size`` are given (then with ``negative_crops_coords_top_left``, default
  (0, 0)); image-to-image / refinement - ``negative_original_size`` / ``negative_target_size``
  defaulting to the positive ones, with the positive crop; the refiner (aesthetic score) -
  ``negative_original_size`` (default ``original_size``), ``negative_crops_coords_top_left``
  (default (0, 0)) and ``negative_aesthetic_score`` (default 2.5; ``aesthetic_score`` 6.0).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

SDXL_OPTIONS = (
    "prompt_2",
    "negative_prompt_2",
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
    "aesthetic_score",
    "negative_aesthetic_score",
)


def _prompts(value, n: int, name: str) -> list[str] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, str) else list(value)
    if len(values) == 1:
        values = values * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} entries, expected 1 or num_images={n}")
    return values


def sdxl_host_inputs(
    conditioner,
    prompts: Sequence[str],
    negatives: Sequence[str] | None,
    num_images: int,
    use_cfg: bool,
    size: tuple[int, int],
    mode: str,
    options: Mapping[str, Any],
) -> tuple[dict, dict | None]:
    """``(cond, uncond or None)`` host inputs of an SDXL request: ``options`` holds any of
    :data:`SDXL_OPTIONS`; ``size`` is the output (height, width); ``mode`` the generation mode
    (text2img follows ``StableDiffusionXLPipeline``'s negative time ids, the others
    ``StableDiffusionXLImg2ImgPipeline``'s)."""
    unknown = sorted(set(options) - set(SDXL_OPTIONS))
    if unknown:
        raise ValueError(f"unknown SDXL option {unknown[0]!r}; expected one of {SDXL_OPTIONS}")
    o = {k: v for k, v in options.items() if v is not None}
    n = num_images
    original = o.get("original_size", size)
    target = o.get("target_size", size)
    crops = o.get("crops_coords_top_left", (0, 0))
    cond = conditioner.host_inputs(
        list(prompts), prompts_2=_prompts(o.get("prompt_2"), n, "prompt_2"), original_size=original,
        crops_coords_top_left=crops, target_size=target, aesthetic_score=o.get("aesthetic_score", 6.0),
    )
    if not use_cfg:
        if "negative_prompt_2" in o:
            raise ValueError("negative_prompt_2 needs classifier-free guidance (guidance_scale != 1)")
        return cond, None
    neg_original, neg_target = o.get("negative_original_size"), o.get("negative_target_size")
    neg_crops = o.get("negative_crops_coords_top_left", (0, 0))
    if conditioner.aesthetic:
        micro = (original if neg_original is None else neg_original, neg_crops, None)
    elif mode == "text2img":
        both = neg_original is not None and neg_target is not None
        micro = (neg_original, neg_crops, neg_target) if both else (original, crops, target)
    else:
        micro = (original if neg_original is None else neg_original, crops, target if neg_target is None else neg_target)
    uncond = conditioner.null_host_inputs(
        n, None if negatives is None else list(negatives),
        negative_2=_prompts(o.get("negative_prompt_2"), n, "negative_prompt_2"),
        original_size=micro[0], crops_coords_top_left=micro[1], target_size=micro[2],
        aesthetic_score=o.get("negative_aesthetic_score", 2.5),
    )
    return cond, uncond


def base_then_refiner(base, refiner, prompts, *, denoising_end: float = 0.8, refiner_options: Mapping | None = None,
                      **options):
    """SDXL's ensemble of expert denoisers: ``base`` runs the steps above diffusers'
    ``denoising_end`` split and hands its partly denoised latents to ``refiner``, which runs the
    rest (``denoising_start=denoising_end``) and decodes. ``options`` go to both calls (seed,
    image_indices, num_steps, sampler, guidance, negative prompts, sizes, ...);
    ``refiner_options`` only to the refiner (e.g. ``aesthetic_score``, its own ``num_steps``).
    Returns what ``refiner(...)`` returns."""
    options = dict(options)
    output_type = options.pop("output_type", "uint8")
    return_latents = options.pop("return_latents", False)
    latents = base(prompts, denoising_end=denoising_end, output_type="latent", **options)
    refined = {k: v for k, v in options.items() if k not in ("target_size", "negative_target_size", "latents")}
    refined.update(refiner_options or {})
    return refiner(prompts, init_latents=latents, denoising_start=denoising_end, output_type=output_type,
                   return_latents=return_latents, **refined)
