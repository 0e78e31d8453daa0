"""Running an exported bundle without torch: ``Bundle`` (onnxruntime sessions, numpy DDIM / DDPM / flow-Euler
samplers), the manifest and its file hashes, portable noise, PNG bytes, SAFREE's text side in numpy."""
