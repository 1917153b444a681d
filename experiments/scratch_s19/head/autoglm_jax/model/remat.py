"""Gradient-checkpointing (remat) policies, selectable by name.

=====================  ==========================================================================
``none``               no checkpointing: every residual the backward pass needs is stored
``full``               store only each layer's input; recompute the whole layer in the backward pass
``dots_saveable``      store matmul outputs (dots without batch dimensions); recompute elementwise ops
                       and the attention einsums
``save_attention_out`` store the tagged activations ``attention_out`` and ``mlp_out`` (see
                       ``DecoderLayer``); recompute the rest
``offload``            like ``save_attention_out`` but the tagged activations go to pinned host memory
                       (device -> ``pinned_host``) and come back for the backward pass
=====================  ==========================================================================

``offload`` needs a backend with a ``pinned_host`` memory space and host-offload support in its compiler;
``check_remat_supported`` says so before any compilation (``RematUnsupportedError``).
"""

from __future__ import annotations

import jax

# Names given to activations with ``checkpoint_name`` inside the layer, usable by the policies below.
ATTENTION_OUT = "attention_out"
MLP_OUT = "mlp_out"

REMAT_POLICIES = ("none", "full", "dots_saveable", "save_attention_out", "offload")

# Backends whose compiler implements host offload of remat residuals (XLA's HostOffloader pass).
_OFFLOAD_BACKENDS = ("gpu", "tpu")


class RematUnsupportedError(RuntimeError):
    """The named remat policy cannot run on this backend; the message says why and what to use instead."""


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


def offload_supported(device: jax.Device | None = None) -> tuple[bool, str]:
    """(supported, reason): whether ``offload`` can run on ``device`` (default: the first device)."""
    device = device if device is not None else jax.devices()[0]
    kinds = sorted({m.kind for m in device.addressable_memories()})
    if device.platform not in _OFFLOAD_BACKENDS:
        return False, (f"backend {device.platform!r} has no host-offload support for remat residuals "
                       f"(memory spaces {kinds}; offload runs on {_OFFLOAD_BACKENDS})")
    if "pinned_host" not in kinds:
        return False, f"device {device} has no 'pinned_host' memory space (has {kinds})"
    return True, "ok"


def check_remat_supported(name: str, device: jax.Device | None = None) -> None:
    """Raises ``ValueError`` for an unknown name and ``RematUnsupportedError`` when ``offload`` cannot run here."""
    remat_policy(name)
    if name == "offload":
        ok, why = offload_supported(device)
        if not ok:
            raise RematUnsupportedError(
                f"remat policy 'offload' is not available: {why}. Use 'save_attention_out' (the same "
                "activations kept on the device) or 'full' (recompute everything) instead.")


def resolve_remat(name: str, device: jax.Device | None = None, *, fallback: bool = False) -> str:
    """The policy name to use on ``device``: ``name`` itself, or with ``fallback=True`` and ``offload`` on a
    backend without host offload, ``save_attention_out`` (with a warning). Without ``fallback`` that case raises
    ``RematUnsupportedError``.

    (On CPU, XLA accepts the offload annotations but device memory already is host memory, so nothing would
    move: the fallback keeps the same activations, which is what ``offload`` computes there anyway.)
    """
    try:
        check_remat_supported(name, device)
    except RematUnsupportedError as e:
        if not fallback:
            raise
        import warnings
        warnings.warn(f"{e} Falling back to 'save_attention_out'.", RuntimeWarning, stacklevel=2)
        return "save_attention_out"
    return name
