"""Pallas kernels for optax-paged (imports only jax and numpy)."""
