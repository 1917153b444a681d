"""Pallas kernels of autoglm-jax. Each module holds a kernel, its validating wrapper and a jnp reference."""

# Quantized matmul (issue 3): weight formats and the one entry point.
from .qmatmul_tiles import TileConfig
from .quant_formats import (Int4Weight, Int8Weight, QuantFormatError, W8A8Weight, quantize, quantize_activations,
                            quantize_int4, quantize_int8, quantize_w8a8)
from .quantized_matmul import quantized_matmul, quantized_matmul_reference

# Attention (issue 4): paged decode, ragged paged prefill, and the dense cache's fused decode step.
from .dense_decode_attention import dense_decode_attention, dense_decode_attention_reference
from .paged_attention import paged_attention, paged_attention_reference
from .ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference

__all__ = [
    "Int4Weight", "Int8Weight", "QuantFormatError", "TileConfig", "W8A8Weight", "dense_decode_attention",
    "dense_decode_attention_reference", "paged_attention", "paged_attention_reference", "quantize",
    "quantize_activations", "quantize_int4", "quantize_int8", "quantize_w8a8", "quantized_matmul",
    "quantized_matmul_reference", "ragged_paged_attention", "ragged_paged_attention_reference",
]
