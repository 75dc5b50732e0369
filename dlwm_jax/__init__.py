"""dlwm-jax: Discrete Latent Space World Models (Robine, Uelwer, Harmeling) in JAX/Flax."""
