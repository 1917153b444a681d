"""Pallas kernels of autoglm-jax. Each module holds a kernel, its validating wrapper and a jnp reference."""

# Quantized matmul (issue 3): weight formats and the one entry point.
from .qmatmul_tiles import TileConfig
from .quant_formats import (Int4Weight, Int8Weight, QuantFormatError, W8A8Weight, quantize, quantize_activations,
                            quantize_int4, quantize_int8, quantize_w8a8)
from .quantized_matmul import quantized_matmul, quantized_matmul_reference

# The attention kernels are imported from their modules (kernels_pallas.paged_attention, .ragged_paged_attention,
# .dense_decode_attention): each module is named like its entry point, so re-exporting the function here would
# replace the module attribute (``import kernels_pallas.paged_attention as pa`` would then bind the function).

__all__ = [
    "Int4Weight", "Int8Weight", "QuantFormatError", "TileConfig", "W8A8Weight", "quantize", "quantize_activations",
    "quantize_int4", "quantize_int8", "quantize_w8a8", "quantized_matmul", "quantized_matmul_reference",
]
