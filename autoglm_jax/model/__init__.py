"""Flax NNX modules of the GLM-4 decoder."""

from .glm import GLMForCausalLM, resolve_dtype
from .linear import Linear
from .remat import REMAT_POLICIES

__all__ = ["GLMForCausalLM", "Linear", "REMAT_POLICIES", "resolve_dtype"]
