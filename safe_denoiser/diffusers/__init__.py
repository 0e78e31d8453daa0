"""Adapters for Hugging Face diffusers: ``attach`` (scheduler wrapper), the SLD UNet wrapper, pipeline builders,
local-folder loading and VAE encoding for banks."""
