"""Kept for one release: the pipeline moved to `ssapo_jax.pipeline`; use
``from ssapo_jax.pipeline.run import run``."""

from ssapo_jax.pipeline.run import run

__all__ = ["run"]
