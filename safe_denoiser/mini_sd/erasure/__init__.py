"""Concept erasure on the miniature SD (the unsafe digit 8): ESD-x (fine-tuned cross-attention, shipped weights)
and UCE (closed-form edit of the cross-attention keys and values, computed at load time)."""

from safe_denoiser.mini_sd.erasure.loader import METHODS, load_erased_pipeline

__all__ = ["METHODS", "load_erased_pipeline"]
