"""Native CPU kernels of optax-paged (see fused.py)."""
