"""The bundled demo and distillation-quality benchmark (`hf-mtkd demo`, `python -m hf_mtkd.demo`)."""
