"""Evaluation at real scale: judges, public prompt sets, ASR/TR with bootstrap intervals, FID/CLIP, the report.

Modules: ``judges`` (the ``Judge`` protocol and registry), ``nudenet`` and ``opennsfw`` (the two packaged ONNX
judges), ``prompt_sets`` (Ring-A-Bell, UnlearnDiffAtk, MMA-Diffusion, I2P, COCO loaders), ``metrics`` (ASR, TR,
bootstrap intervals), ``quality`` (FID and CLIP score with torchmetrics, local weights only), ``judging``
(incremental judging of ``ImageWriter`` folders), ``table`` (markdown tables and the ASR-against-quality plot,
shared with the digits ``evaluate``), ``report`` and ``cli`` (``safe-denoiser report`` / ``safe-denoiser prompts``).
"""
