"""Flax linen modules of the Scientific Spaces posts: pure functions of their parameters, no mesh axis names."""
KEXUE_JAX_PACKAGE = "models"  # train_lib checks this marker: another distribution's `models` would lack it
