"""Pallas kernels of autoglm-jax. Each module holds a kernel, its validating wrapper and a jnp reference."""

# Quantized matmul (issue 3): weight formats and the one entry point.
from .qmatmul_tiles import TileConfig
from .quant_formats import (Int4Weight, Int8Weight, QuantFormatError, W8A8Weight, quantize, quantize_activations,
                            quantize_int4, quantize_int8, quantize_w8a8)
from .quantized_matmul import quantized_matmul, quantized_matmul_reference

__all__ = [
    "Int4Weight", "Int8Weight", "QuantFormatError", "TileConfig", "W8A8Weight", "quantize", "quantize_activations",
    "quantize_int4", "quantize_int8", "quantize_w8a8", "quantized_matmul", "quantized_matmul_reference",
]
