"""Text attacks on the miniature SD (issue 23), run here: Ring-A-Bell, MMA-Diffusion's text modality, I2P-like and
benign prompt sets (``python -m safe_denoiser.mini_sd.attacks`` writes configs/prompts/mini_sd_attacks/).

Modules: ``filter`` (the concept's sensitive words), ``text`` (the shipped tokenizer and text encoder, the vocabulary
an attack may use), ``ring_a_bell``, ``mma``, ``prompt_sets``, ``files`` (the public CSV forms), ``asr`` (attack
success on the base model). UnlearnDiffAtk: ``sources`` (its prompt set, chosen on the base model) and
``unlearndiff`` (the attack against an erased model).
"""
