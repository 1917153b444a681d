"""The GLM forward pass as a ``lax.scan`` over stacked layer parameters, for training.

The canonical parameter layout is the serving model's: a pure dict whose ``"layers"`` entry maps layer
index -> that layer's tree (``nnx.state(model).to_pure_dict()``). Training stacks the layers into one tree
with a leading [L] axis (``stack_layers``) so the step compiles one layer body, wrapped in ``jax.checkpoint``
with the chosen remat policy; ``unstack_layers`` goes back, so ``to_model`` gives a ``GLMForCausalLM`` that
``save_pretrained`` writes and ``from_pretrained`` reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..config import GLMConfig
from ..model import GLMForCausalLM, resolve_dtype
from ..model.remat import remat_policy


def stack_layers(params: dict) -> dict:
    """Canonical pure dict (``layers: {i: tree}``) -> the same dict with ``layers`` one tree of [L, ...] arrays."""
    layers = params["layers"]
    ordered = [layers[i] for i in sorted(layers, key=int)]
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)
    return out


def unstack_layers(params: dict) -> dict:
    """Inverse of ``stack_layers``: [L, ...] leaves -> ``layers: {i: tree}`` (int keys, as nnx uses)."""
    stacked = params["layers"]
    n = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)}
    return out


def _template(cfg: GLMConfig, dtype) -> GLMForCausalLM:
    return nnx.eval_shape(lambda: GLMForCausalLM(cfg, dtype=dtype, param_dtype="float32", rngs=nnx.Rngs(0)))


@dataclasses.dataclass(frozen=True)
class ScannedGLM:
    """Pure functions of (stacked params, tokens) for one config, compute dtype and remat policy.

    Hashable (graph definitions only, no arrays), so it can be a static argument of ``jax.jit``.
    """

    cfg: GLMConfig
    dtype: str
    remat: str
    layer_def: Any
    norm_def: Any
    head_def: Any

    @classmethod
    def create(cls, cfg: GLMConfig, *, dtype: str = "float32", remat: str = "none") -> "ScannedGLM":
        remat_policy(remat)  # validates the name
        model = _template(cfg, resolve_dtype(dtype))
        head_def = None if model.lm_head is None else nnx.graphdef(model.lm_head)
        return cls(cfg=cfg, dtype=str(np.dtype(resolve_dtype(dtype))), remat=remat,
                   layer_def=nnx.graphdef(model.layers[0]), norm_def=nnx.graphdef(model.final_norm),
                   head_def=head_def)

    def init_params(self, seed: int) -> dict:
        """Stacked float32 parameters of a freshly initialised model (same init as ``GLMForCausalLM``)."""
        model = GLMForCausalLM(self.cfg, dtype=self.dtype, param_dtype="float32", rngs=nnx.Rngs(seed))
        return stack_layers(nnx.state(model).to_pure_dict())

    def abstract_params(self) -> dict:
        """ShapeDtypeStruct leaves of ``init_params`` (float32, layers stacked); allocates nothing."""
        tree = nnx.state(_template(self.cfg, self.dtype)).to_pure_dict()
        sds = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)
        layers = [tree["layers"][i] for i in sorted(tree["layers"], key=int)]
        out = {k: jax.tree.map(lambda x: sds(x.shape), v) for k, v in tree.items() if k != "layers"}
        out["layers"] = jax.tree.map(lambda *xs: sds((len(xs),) + tuple(xs[0].shape)), *layers)
        return out

    def hidden_states(self, params: dict, input_ids: jax.Array, positions: jax.Array | None = None,
                      attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids: [B, T] -> h [B, T, D] after the final norm (no cache: causal over the T tokens)."""
        dtype = resolve_dtype(self.dtype)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        h = jnp.take(params["embed"], input_ids, axis=0).astype(dtype)
        h = self.layer_stack(params["layers"], h, positions, attention_mask)
        return nnx.merge(self.norm_def, params["final_norm"])(h)

    def layer_stack(self, layers: dict, h: jax.Array, positions: jax.Array,
                    attention_mask: jax.Array | None = None) -> jax.Array:
        """h: [B, T, D] through every decoder layer: ``lax.scan`` over the stacked [L, ...] ``layers``, the body
        wrapped in ``jax.checkpoint`` with this object's remat policy (unless ``none``)."""
        def body(h, layer_params):
            layer = nnx.merge(self.layer_def, layer_params)
            return layer(h, positions, layer=0, attention_mask=attention_mask)[0], None

        if self.remat != "none":
            body = jax.checkpoint(body, policy=remat_policy(self.remat), prevent_cse=False)
        return jax.lax.scan(body, h, layers)[0]

    def logits(self, params: dict, h: jax.Array) -> jax.Array:
        """h: [..., D] -> float32 logits [..., V]."""
        if self.head_def is None:
            out = jnp.einsum("...d,vd->...v", h, params["embed"].astype(h.dtype))
        else:
            out = nnx.merge(self.head_def, params["lm_head"])(h)
        return out.astype(jnp.float32)

    def __call__(self, params: dict, input_ids: jax.Array, positions=None, attention_mask=None) -> jax.Array:
        return self.logits(params, self.hidden_states(params, input_ids, positions, attention_mask))

    def to_model(self, params: dict, *, dtype: str | None = None) -> GLMForCausalLM:
        """A serving ``GLMForCausalLM`` (unrolled layers) holding ``params`` cast to ``dtype`` (default: float32
        storage, this object's compute dtype)."""
        dtype = dtype or "float32"
        model = nnx.eval_shape(lambda: GLMForCausalLM(self.cfg, dtype=dtype, param_dtype=dtype,
                                                      rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        target = resolve_dtype(dtype)
        state.replace_by_pure_dict(jax.tree.map(lambda x: jnp.asarray(x, target), unstack_layers(params)))
        return nnx.merge(graphdef, state)


def params_from_model(model: GLMForCausalLM) -> dict:
    """Stacked float32 training parameters from a serving model (e.g. ``from_pretrained(...)``)."""
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), stack_layers(nnx.state(model).to_pure_dict()))
