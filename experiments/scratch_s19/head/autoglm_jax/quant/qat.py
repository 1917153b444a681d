"""Quantization-aware training: fine-tune through fake-quantized weights with the training loop's step, then
export real quantized weights that run on the kernels.

``QATForward`` wraps the training forward (``train.ScannedGLM``, stacked layers): before the float forward, each
quantized linear's kernel ``w[L, I, O]`` goes through ``fake_quant_weight`` with learnable scales (LSQ, Esser et
al. 2020; straight-through gradient for ``w`` inside the range, zero outside). Parameters are
``{"model": stacked float params, "qat": {name: {"ratio", "scale0", "zero"}}}`` with ``scale = scale0 * ratio``:
``scale0`` comes from the weight observer at the start, ``ratio`` (initially 1) is trained, ``scale0`` and the
integer zero points get no gradient. The step, the loss, the schedule and ``evaluate`` are those of
``autoglm_jax.train``; the optimizer is ``train.make_optimizer``'s AdamW with weight decay on the model's
matrices only.

Scope: weight fake quantization for int8 / int4 (g64/g128, sym/asym) / w8a8 weights; W8A8 activations are not
fake-quantized during training (the exported model quantizes them per token at run time). Linears of the
stacked layers are fake-quantized per layer (``keep_float`` paths such as ``layers.0.*`` stay float), the LM
head when not kept float.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from ..model import GLMForCausalLM
from ..model.linear import Linear
from ..model.quantized_linear import QuantizedLinear
from ..train import ScannedGLM, TokenBatches, TrainConfig, params_from_model
from ..train.state import TrainState, init_train_state, learning_rate_schedule
from ..train.step import make_train_step
from .calibrate import iter_linears, matches, set_child
from .fake_quant import fake_quant_weight, quantize_weight, weight_qparams
from .observers import weight_clip_range
from .ptq import PTQConfig, PTQError, quantization_dict


@dataclasses.dataclass(frozen=True)
class QATTarget:
    path: tuple  # key path of the linear in the stacked params, e.g. ("layers", "attn", "qkv_proj")
    layer_mask: tuple[bool, ...] | None  # stacked layers: which layers are fake-quantized; None for top level

    @property
    def name(self) -> str:
        return ".".join(self.path)


@dataclasses.dataclass(frozen=True)
class QATForward:
    """``fwd(params, input_ids) -> logits`` through fake-quantized weights; hashable (a static jit argument)."""

    base: ScannedGLM
    fmt: str
    group: int
    symmetric: bool
    targets: tuple[QATTarget, ...]
    lsq: bool = True

    def fake_quantized(self, params: dict) -> dict:
        """The stacked model params with every target kernel fake-quantized."""
        out = _copy_tree(params["model"])
        for t in self.targets:
            q = params["qat"][t.name]
            node = _get(out, t.path)
            w = node["kernel"]
            scale = jax.lax.stop_gradient(q["scale0"]) * q["ratio"]
            fq = fake_quant_weight(w, scale, jax.lax.stop_gradient(q["zero"]), self.fmt, self.group, lsq=self.lsq)
            if t.layer_mask is not None and not all(t.layer_mask):
                fq = jnp.where(jnp.asarray(t.layer_mask)[:, None, None], fq, w)
            node["kernel"] = fq
        return out

    def __call__(self, params: dict, input_ids, positions=None, attention_mask=None):
        return self.base(self.fake_quantized(params), input_ids, positions, attention_mask)


def _copy_tree(tree):
    return {k: _copy_tree(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _get(tree: dict, path: tuple) -> dict:
    for k in path:
        tree = tree[k]
    return tree


def init_qat(model: GLMForCausalLM, cfg: PTQConfig, *, dtype: str = "float32", remat: str = "none"
             ) -> tuple[QATForward, dict]:
    """(forward, params) for QAT from a float model; scales start from ``cfg.weight_observer``."""
    if cfg.activations != "dynamic":
        raise PTQError("QAT exports W8A8 with dynamic activations only (activations are not fake-quantized)")
    base = ScannedGLM.create(model.cfg, dtype=dtype, remat=remat)
    params = jax.tree.map(jnp.copy, params_from_model(model))  # the train step donates them: never the model's
    n_layers = model.cfg.num_layers
    found: dict[tuple, list[bool]] = {}
    for path, *_, layer in iter_linears(model, types=(Linear,)):
        parts = path.split(".")
        if parts[0] == "layers":
            key, l = ("layers",) + tuple(parts[2:]), int(parts[1])
        else:
            key, l = tuple(parts), 0
        ok = not matches(path, cfg.keep_float)
        if ok and cfg.method == "int4" and layer.in_features % cfg.group:
            if not cfg.keep_indivisible:
                raise PTQError(f"int4 group size {cfg.group} does not divide K = I = {layer.in_features} of {path}")
            ok = False
        found.setdefault(key, [False] * (n_layers if parts[0] == "layers" else 1))[l] = ok
    targets, qat = [], {}
    for key, mask in found.items():
        if not any(mask):
            continue
        stacked = key[0] == "layers"
        t = QATTarget(path=key, layer_mask=tuple(mask) if stacked else None)
        w = _get(params, key)["kernel"]
        ws = w if stacked else w[None]
        lo, hi = zip(*[weight_clip_range(ws[i], cfg.weight_observer, cfg.method, group=cfg.group,
                                         symmetric=cfg.symmetric) for i in range(ws.shape[0])])
        scale, zero = weight_qparams(jnp.stack(lo), jnp.stack(hi), cfg.method, cfg.symmetric)
        if not stacked:
            scale, zero = scale[0], zero[0]
        qat[t.name] = {"ratio": jnp.ones_like(scale), "scale0": scale, "zero": zero}
        targets.append(t)
    if not targets:
        raise PTQError("no linear layer is left to quantize (keep_float matches them all?)")
    fwd = QATForward(base=base, fmt=cfg.method, group=cfg.group, symmetric=cfg.symmetric, targets=tuple(targets))
    return fwd, {"model": params, "qat": qat}


def make_qat_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """``train.make_optimizer``'s AdamW (warmup + cosine, clipping), weight decay on the model's matrices only."""
    def mask(params):
        model = params["model"]
        out = {k: jax.tree.map(lambda x: x.ndim >= 2, v) for k, v in model.items() if k != "layers"}
        out["layers"] = jax.tree.map(lambda x: x.ndim >= 3, model["layers"])
        return {"model": out, "qat": jax.tree.map(lambda _: False, params["qat"])}

    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw) if cfg.grad_clip_norm > 0 else adamw


@dataclasses.dataclass
class QATResult:
    fwd: QATForward
    state: TrainState
    history: list[dict]
    config: PTQConfig


def qat_train(model: GLMForCausalLM, cfg: PTQConfig, train_cfg: TrainConfig, data: TokenBatches, *,
              progress: bool = True, on_log: Callable[[dict], None] | None = None) -> QATResult:
    """Fine-tunes ``model`` (not modified) for ``train_cfg.total_steps`` steps through fake-quantized weights."""
    if data.batch_size != train_cfg.batch_size or data.seq_len != train_cfg.seq_len:
        raise PTQError(f"data gives {data.batch_size} x {data.seq_len} batches; the config asks for "
                       f"{train_cfg.batch_size} x {train_cfg.seq_len}")
    fwd, params = init_qat(model, cfg, dtype=train_cfg.dtype, remat=train_cfg.remat)
    tx = make_qat_optimizer(train_cfg)
    step_fn = make_train_step(fwd, tx, train_cfg)
    state = init_train_state(params, tx, train_cfg.seed)
    history = []
    bar = tqdm(range(train_cfg.total_steps), desc=f"QAT {cfg.label}", disable=not progress, unit="step")
    for i in bar:
        tokens, mask = data.batch(i)
        state, metrics = step_fn(state, tokens, mask)
        if (i + 1) % train_cfg.log_every == 0 or i + 1 == train_cfg.total_steps:
            row = {"step": i + 1, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"])}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            if on_log:
                on_log(row)
    return QATResult(fwd=fwd, state=state, history=history, config=cfg)


def qat_export(fwd: QATForward, params: dict, *, dtype: str = "bfloat16") -> tuple[GLMForCausalLM, dict]:
    """Real quantized model (``QuantizedLinear`` on the kernels) from QAT params + its ``quantization`` dict.

    Each target kernel is quantized from the float32 weights with the learned scales, with the rounding of the
    fake-quantized forward; everything else (embedding, norms, biases, kept layers) is cast to ``dtype``.
    """
    model = fwd.base.to_model(params["model"], dtype=dtype)
    by_path = {path: entry for path, *entry in iter_linears(model, types=(Linear,))}
    for t in fwd.targets:
        q = params["qat"][t.name]
        w = _get(params["model"], t.path)["kernel"]
        scale = q["scale0"] * q["ratio"]
        layers = range(len(t.layer_mask)) if t.layer_mask is not None else [None]
        for l in layers:
            path = f"layers.{l}.{'.'.join(t.path[1:])}" if l is not None else t.name
            if l is not None and not t.layer_mask[l]:
                continue
            parent, attr, idx, linear = by_path.pop(path)
            sel = (lambda a: a[l]) if l is not None else (lambda a: a)
            qw = quantize_weight(jnp.asarray(sel(w), jnp.float32), sel(scale), sel(q["zero"]), fwd.fmt, fwd.group,
                                 symmetric=fwd.symmetric)
            axes = tuple(linear.kernel.get_metadata().get("logical_axes", (None, None)))
            bias = None if linear.bias is None else linear.bias[...]
            set_child(parent, attr, idx, QuantizedLinear(qw, axes=axes, bias=bias, dtype=linear.dtype))
    kept = sorted(by_path)
    cfg = PTQConfig(method=fwd.fmt, group=fwd.group, symmetric=fwd.symmetric, keep_float=())
    return model, quantization_dict(cfg, kept)
