"""Flax Linen modules of the world model and the agent; use them only through init/apply."""
