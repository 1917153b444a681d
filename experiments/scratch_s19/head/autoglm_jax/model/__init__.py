"""Flax NNX modules of the GLM-4 decoder."""

from .glm import GLMForCausalLM, resolve_dtype
from .linear import Linear
from .quantized_linear import QuantizedLinear, quantize_model
from .remat import REMAT_POLICIES

__all__ = ["GLMForCausalLM", "Linear", "QuantizedLinear", "REMAT_POLICIES", "quantize_model", "resolve_dtype"]
