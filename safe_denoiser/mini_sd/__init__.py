"""A miniature Stable Diffusion trained here on scikit-learn's digits (demo layer: generic modules never import it).

Its stages (``python -m safe_denoiser.mini_sd.train tokenizer|clip|vae|unet|bank``) build a genuine
``diffusers.StableDiffusionPipeline`` folder, shipped in ``safe_denoiser/assets/mini_sd`` (its TRAINING.md).
"""
