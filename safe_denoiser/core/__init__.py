"""The core: pure tensor math and the negative bank. No diffusers, Lightning or onnxruntime here.

- ``kernel``: the kernel estimate of E_unsafe[x0 | x_t] and its log-mass (online logsumexp over bank chunks)
- ``correction``: Theorem 1 in x0 space and in noise space; the CFG combination
- ``parameterization``: eps / v / x0 conversions (VP and sigma forms)
- ``config``: ``SafeGuidance``, the validated settings and presets
- ``step``: one sampler step's correction for each preset, with window and gate
- ``sld``: the Safe Latent Diffusion guidance equations
- ``bank``: ``NegativeBank``, stored as safetensors
"""
