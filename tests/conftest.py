"""Shared fixtures: small random Hugging Face GLM checkpoints written to disk (for parity and loading tests)."""

from __future__ import annotations

import os
import pkgutil


def _add_xla_flags(*flags: str) -> None:
    """Appends flags to XLA_FLAGS unless the environment already names them (must run before jax starts)."""
    have = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in flags if f.split("=")[0] not in have]
    os.environ["XLA_FLAGS"] = " ".join([have, *extra]).strip()


# Eight virtual CPU devices, so that sharding tests run on one machine.
_add_xla_flags("--xla_force_host_platform_device_count=8")
# With no accelerator plugin installed (CPU CI), compile with LLVM's cheap pipeline: the suite is mostly XLA compile
# time of small programs, and these flags cut it by about a fifth (the code is the same, only less optimised).
if not any(m.name.startswith(("jax_cuda", "jax_rocm", "libtpu")) for m in pkgutil.iter_modules()):
    _add_xla_flags("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (skipped by default; AUTOGLM_RUN_SLOW=1 does the same)")


def pytest_collection_modifyitems(config, items):
    on_gpu = jax.default_backend() == "gpu"
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (jax backend is %s)" % jax.default_backend())
    run_slow = config.getoption("--runslow") or os.environ.get("AUTOGLM_RUN_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow (or AUTOGLM_RUN_SLOW=1)")
    for item in items:
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip_gpu)
        elif "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
