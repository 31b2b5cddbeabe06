"""rlhf_jax: SFT -> preference data -> reward model -> policy optimisation, in JAX."""

__version__ = "0.1.0"
