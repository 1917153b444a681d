"""Gradient-checkpointing (remat) policies, selectable by name."""

from __future__ import annotations

import jax

# Names given to activations with ``checkpoint_name`` inside the layer, usable by the policies below.
ATTENTION_OUT = "attention_out"
MLP_OUT = "mlp_out"

REMAT_POLICIES = ("none", "full", "dots_saveable", "save_attention_out", "offload")


def remat_policy(name: str):
    """Returns the ``jax.checkpoint`` policy for ``name`` (None for ``full``, which saves nothing, and for ``none``)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; allowed: {REMAT_POLICIES}")
    if name in ("none", "full"):
        return None
    if name == "dots_saveable":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "save_attention_out":
        return jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT, MLP_OUT)
    if name == "offload":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[], names_which_can_be_offloaded=[ATTENTION_OUT, MLP_OUT],
            offload_src="device", offload_dst="pinned_host")
    raise AssertionError(name)
