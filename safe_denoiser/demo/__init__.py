"""The bundled demo: an 8x8-digits diffusion model, its judge and evaluation, the 2-D toy and Gaussian mixtures
with closed-form posteriors (the tests' independent reference)."""
