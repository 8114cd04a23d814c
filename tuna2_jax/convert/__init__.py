"""Weight conversion between Hugging Face checkpoints and tuna2_jax (safetensors only, no pickle)."""
