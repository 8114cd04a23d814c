"""Grain input pipelines: sources, tokenizers, task templates, any-res images, packing."""
