"""Distributed generation with ``trainer.predict``: ``SafeDiffusionModule``, prompt sets, ``PromptDataModule``,
``ImageWriter`` and the ``safe-denoiser predict`` LightningCLI."""
