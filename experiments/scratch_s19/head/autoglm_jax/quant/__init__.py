"""Quantization workflows on top of ``kernels_pallas.quant_formats``: observers, calibration, post-training
quantization (PTQ), fake quantization with a straight-through estimator, quantization-aware training (QAT),
and the ``autoglm quantize`` command."""

from .calibrate import CalibrationError, calibrate
from .fake_quant import fake_quant, fake_quant_activations, fake_quant_weight, quantize_weight, weight_qparams
from .observers import ActStats, Observer, ObserverError, activation_clip, parse_observer, weight_clip_range
from .ptq import PTQConfig, PTQError, PTQReport, quantize
from .qat import QATForward, init_qat, qat_export, qat_train
from .cli import quantize_main

__all__ = ["ActStats", "CalibrationError", "Observer", "ObserverError", "PTQConfig", "PTQError", "PTQReport",
           "activation_clip", "calibrate", "fake_quant", "fake_quant_activations", "fake_quant_weight",
           "parse_observer", "quantize", "quantize_weight", "weight_clip_range", "weight_qparams",
           "QATForward", "init_qat", "qat_export", "qat_train", "quantize_main"]
