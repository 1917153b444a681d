"""Post-training quantization of a whole model, in place, into the formats the kernels run.

Methods (``PTQConfig.method``): ``int8`` weight-only per output channel (``k_major=True``: stored K-major
``[O, I]``; ``k_major="auto"``: per weight, K-major unless I > O; recorded in the ``quantization`` dict);
``int4`` grouped (``group`` 64/128, symmetric or asymmetric; ``k_major`` True or ``"auto"``: stored K-major,
the layout of the GPU's one-row integer-dot kernel); ``w8a8`` with dynamic per-token activation
scales (``activations="dynamic"``) or one static scale per layer from calibration (``activations="static"``,
``act_stats`` from ``calibrate``). ``weight_observer`` picks each channel's/group's clip range (absmax = the
plain round-to-nearest of ``quant_formats``), ``act_observer`` the static activation clip. Layers matching
``keep_float`` stay float, as do int4 layers whose K is not a multiple of the group when ``keep_indivisible``
is set (an error otherwise); the report lists every kept layer and why.

The ``quantization`` dict of the report is what ``save_pretrained(..., quantization=...)`` stores and what
``load_orbax`` passes to ``quantize_model`` to rebuild the same structure (kept layers by exact path).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.quant_formats import K_MAJOR_FORMATS, QuantFormatError, check_k_major_choice

from ..model.linear import Linear
from ..model.quantized_linear import QuantizedLinear
from .calibrate import iter_linears, matches, set_child
from .fake_quant import WEIGHT_FORMATS, check_weight_format, quantize_weight, weight_qparams
from .observers import ActStats, Observer, activation_clip, parse_observer, weight_clip_range

ACTIVATIONS = ("dynamic", "static")


class PTQError(ValueError):
    """A quantization request that cannot run; raised before any layer is changed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQConfig:
    method: str  # "int8" | "int4" | "w8a8"
    group: int = 128  # int4 only
    symmetric: bool = True  # int4 only
    activations: str = "dynamic"  # w8a8 only: "dynamic" (per token) or "static" (calibrated)
    weight_observer: Observer = Observer()
    act_observer: Observer = Observer()
    keep_float: tuple[str, ...] = ("lm_head",)
    keep_indivisible: bool = False  # int4: keep layers with I % group != 0 float instead of raising
    k_major: bool | str = False  # int8 / int4: stored [O, I] (K-major); "auto": per format and shape (resolve_k_major)

    def __post_init__(self):
        if self.method not in WEIGHT_FORMATS:
            raise PTQError(f"unknown quantization method {self.method!r}; allowed: {list(WEIGHT_FORMATS)}")
        try:
            check_weight_format(self.method, self.group)
        except ValueError as e:
            raise PTQError(str(e)) from None
        if self.activations not in ACTIVATIONS:
            raise PTQError(f"activations={self.activations!r}; allowed: {list(ACTIVATIONS)}")
        if self.activations == "static" and self.method != "w8a8":
            raise PTQError(f"static activation scales are for method 'w8a8' only; got {self.method!r}")
        try:
            check_k_major_choice(self.k_major)
        except QuantFormatError as e:
            raise PTQError(str(e)) from None
        if self.k_major and self.method not in K_MAJOR_FORMATS:
            raise PTQError(f"the K-major weight layout ([O, I], k_major) is for methods {list(K_MAJOR_FORMATS)} "
                           f"only; got {self.method!r}")
        object.__setattr__(self, "weight_observer", parse_observer(self.weight_observer))
        object.__setattr__(self, "act_observer", parse_observer(self.act_observer))
        object.__setattr__(self, "keep_float", tuple(self.keep_float))

    @property
    def label(self) -> str:
        if self.method == "int4":
            base = f"int4_g{self.group}_{'sym' if self.symmetric else 'asym'}"
            base += {False: "", True: "_kmajor", "auto": "_auto", "wide": "_wide"}[self.k_major]
        elif self.method == "w8a8":
            base = f"w8a8_{self.activations}" + (f"_{self.act_observer.name}" if self.activations == "static" else "")
        else:
            base = {False: "int8", True: "int8_kmajor", "auto": "int8_auto", "wide": "int8_wide"}[self.k_major]
        return base + ("" if self.weight_observer.kind == "absmax" else f"_w-{self.weight_observer.name}")


@dataclasses.dataclass
class PTQReport:
    config: PTQConfig
    quantized: list[str]
    kept_float: dict[str, str]  # path -> reason
    weight_rel_error: dict[str, float]  # path -> ||dequant(w_q) - w|| / ||w||
    act_clip: dict[str, float]  # path -> static activation clip (w8a8 static)
    quantization: dict  # for save_pretrained / load_orbax -> quantize_model(**quantization)
    float_bytes: int = 0
    quantized_bytes: int = 0

    def summary(self) -> str:
        lines = [f"{self.config.label}: {len(self.quantized)} layers quantized, {len(self.kept_float)} kept float "
                 f"(linear weights {self.float_bytes / 1e6:.2f} MB -> {self.quantized_bytes / 1e6:.2f} MB)"]
        lines += [f"  kept float: {p} ({why})" for p, why in self.kept_float.items()]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"config": self.config.label, "quantized": self.quantized, "kept_float": self.kept_float,
                "weight_rel_error": self.weight_rel_error, "act_clip": self.act_clip,
                "quantization": self.quantization, "float_bytes": self.float_bytes,
                "quantized_bytes": self.quantized_bytes}


def plan(model: nnx.Module, cfg: PTQConfig, act_stats: dict[str, ActStats] | None = None
         ) -> tuple[list[tuple], dict[str, str]]:
    """Which layers get quantized and which stay float (with reasons); raises ``PTQError`` on what cannot run.

    Works on an abstract model (``nnx.eval_shape``) too: only shapes are read.
    """
    todo, kept = [], {}
    for entry in iter_linears(model, types=(Linear,)):
        path, layer = entry[0], entry[-1]
        if matches(path, cfg.keep_float):
            kept[path] = "keep_float"
            continue
        if cfg.method == "int4" and layer.in_features % cfg.group:
            if not cfg.keep_indivisible:
                raise PTQError(f"int4 group size {cfg.group} does not divide K = I = {layer.in_features} of "
                               f"{path}; choose a group dividing it (allowed: 64, 128) or keep the layer float "
                               f"(--keep-float {path.rsplit('.', 1)[-1]})")
            kept[path] = f"K={layer.in_features} not a multiple of group {cfg.group}"
            continue
        todo.append(entry)
    if cfg.activations == "static":
        missing = [e[0] for e in todo if not act_stats or e[0] not in act_stats]
        if missing:
            raise PTQError(f"static activation scales need calibration statistics; missing for {missing[:4]}"
                           f"{' ...' if len(missing) > 4 else ''} (run calibrate() on the float model first)")
    if not todo:
        raise PTQError("no linear layer is left to quantize (keep_float matches them all?)")
    return todo, kept


@functools.partial(jax.jit, static_argnames=("observer", "method", "group", "symmetric", "k_major"))
def _quantize_kernel(w: jax.Array, *, observer: Observer, method: str, group: int, symmetric: bool,
                     k_major: bool | str):
    """Float ``w [I, O]`` -> (the quantized weight, its relative error): one program per (shape, config), where
    op-by-op dispatch compiled each of the observer's and the format's small ops on its own (hundreds of compiles
    for a model of four shapes)."""
    w = w.astype(jnp.float32)
    lo, hi = weight_clip_range(w, observer, method, group=group, symmetric=symmetric)
    scale, zero = weight_qparams(lo, hi, method, symmetric)
    qw = quantize_weight(w, scale, zero, method, group, symmetric=symmetric, k_major=k_major)
    return qw, jnp.linalg.norm(qw.dequantize() - w) / jnp.maximum(jnp.linalg.norm(w), 1e-30)


def quantize_linear(linear: Linear, cfg: PTQConfig, act_clip: float | None = None
                    ) -> tuple[QuantizedLinear, float]:
    """One ``Linear`` -> (``QuantizedLinear``, relative weight error) with the config's weight observer."""
    qw, err = _quantize_kernel(linear.kernel[...], observer=cfg.weight_observer, method=cfg.method,
                               group=cfg.group, symmetric=cfg.symmetric, k_major=cfg.k_major)
    err = float(err)
    axes = tuple(linear.kernel.get_metadata().get("logical_axes", (None, None)))
    bias = None if linear.bias is None else linear.bias[...]
    act = None if act_clip is None else jnp.full((1,), act_clip / 127.0, jnp.float32)
    return QuantizedLinear(qw, axes=axes, bias=bias, dtype=linear.dtype, act_scale=act), err


def quantize(model: nnx.Module, cfg: PTQConfig, *, act_stats: dict[str, ActStats] | None = None) -> PTQReport:
    """Quantizes ``model``'s linear layers in place (see the module docstring) and returns the report."""
    todo, kept = plan(model, cfg, act_stats)
    report = PTQReport(config=cfg, quantized=[], kept_float=kept, weight_rel_error={}, act_clip={},
                       quantization={})
    for path, parent, attr, idx, linear in todo:
        clip = None
        if cfg.activations == "static":
            clip = activation_clip(act_stats[path], cfg.act_observer)
            report.act_clip[path] = clip
        new, err = quantize_linear(linear, cfg, clip)
        report.float_bytes += linear.kernel[...].nbytes
        report.quantized_bytes += new.weight().nbytes()
        set_child(parent, attr, idx, new)
        report.quantized.append(path)
        report.weight_rel_error[path] = err
    jax.block_until_ready(nnx.state(model))
    report.quantization = quantization_dict(cfg, list(kept))
    return report


def quantization_dict(cfg: PTQConfig, kept_paths: list[str]) -> dict:
    """Keyword arguments of ``quantize_model`` that rebuild the quantized structure (JSON-serializable).
    ``k_major`` is recorded only when set, so an [I, O] dict (and checkpoint) reads as before; absent = [I, O]. An
    int4 ``"auto"`` is recorded as what it resolves to now, True (every weight K-major), since a recorded int4
    ``"auto"`` means the earlier rule (``"wide"``, ``autoglm_jax.loading.stored_quantization``)."""
    keep = list(dict.fromkeys(list(cfg.keep_float) + kept_paths))
    out = {"fmt": cfg.method, "group": cfg.group, "symmetric": cfg.symmetric, "keep_float": keep}
    if cfg.k_major:
        out["k_major"] = True if (cfg.method, cfg.k_major) == ("int4", "auto") else cfg.k_major
    if cfg.activations == "static":
        out["static_activations"] = True
    return out
