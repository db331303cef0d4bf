"""Hugging Face interop: `modeling_escarda.py` is copied into every exported folder."""
