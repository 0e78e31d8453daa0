"""The poster's table on the miniature Stable Diffusion (``safe-denoiser evaluate --model mini-sd``).

Modules: ``rows`` (``Row``, ``TextDefence``, ``MINI_SD_PRESETS``, the row sets), ``settings`` (the prompt sets, the
seed sets, ``TableSettings``, ``QUICK``), ``harness`` (generation with the row's defences, per-image scores, the
per-row cache), ``report`` (figures with intervals, the poster-layout table, the plot), ``run`` (``run_table``).
"""
