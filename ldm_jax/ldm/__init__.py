"""The model layer shared by training and inference: what a latent (or pixel-space)
diffusion model is made of, built once from a config.

* :mod:`~ldm_jax.ldm.sections` - the config sections of a model (JAX-free, importable by
  ``configs/``) and the one section merge;
* :mod:`~ldm_jax.ldm.first_stage` - first-stage adapters (KL / VQ / pixel space), the one
  autoencoder builder and the one loader (pixel space, a diffusers folder, a training run);
* :mod:`~ldm_jax.ldm.conditioning` - conditioners (class / text / none, each with its
  classifier-free-guidance ``drop``), the conditioner registry, concat conditions;
* :mod:`~ldm_jax.ldm.model` - :class:`DiffusionModel` and :func:`build_model`;
* :mod:`~ldm_jax.ldm.generation` - the ONE generation program (training previews and the
  pipeline run it).

Nothing is imported here, so ``import ldm_jax.ldm.sections`` stays free of JAX.
"""
