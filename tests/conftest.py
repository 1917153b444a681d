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
    # A module's FULL_GRID names the cases of its parametrized tests beyond the CPU subset (the CI suite must stay
    # under 15 minutes on 2 cores): on the CPU they run with --runslow; on a GPU always.
    skip_grid = pytest.mark.skip(reason="full grid: on the CPU only with --runslow (or AUTOGLM_RUN_SLOW=1)")
    _check_full_grid_names(items)
    for item in items:
        if item.name in getattr(getattr(item, "module", None), "FULL_GRID", ()):
            item.add_marker(pytest.mark.full_grid)
        if "gpu" in item.keywords and not on_gpu:
            item.add_marker(skip_gpu)
        elif "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        elif "full_grid" in item.keywords and not (run_slow or on_gpu):
            item.add_marker(skip_grid)


def _check_full_grid_names(items) -> None:
    """A FULL_GRID name that matches no collected case of its test (a typo, a renamed id) is an error, not a silent
    no-op: checked wherever the test's cases were collected (at least two of them)."""
    by_module = {}
    for item in items:
        if getattr(item, "module", None) is not None:
            by_module.setdefault(item.module, []).append(item.name)
    for module, names in by_module.items():
        for name in getattr(module, "FULL_GRID", ()):
            base = name.split("[")[0]
            if name not in names and sum(n.split("[")[0] == base for n in names) >= 2:
                raise pytest.UsageError(f"{module.__name__}.FULL_GRID names {name!r}, which is no collected case of "
                                        f"{base} (collected: {sorted({n for n in names if n.split('[')[0] == base})})")
