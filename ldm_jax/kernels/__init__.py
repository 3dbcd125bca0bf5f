"""Attention kernels: pure functions on arrays (no Flax), one interface over several backends.

A package of its own rather than a part of ``ldm_jax.models``: the kernels know nothing of
modules or parameters, the U-Net, the VAE and the text encoders all call them, and a
platform-specific kernel (Pallas) stays out of the import path of the model definitions
until it is selected.
"""

from ldm_jax.kernels.attention import BACKEND_NAMES, BACKENDS, dot_product_attention, select_backend

__all__ = ["BACKEND_NAMES", "BACKENDS", "dot_product_attention", "select_backend"]
