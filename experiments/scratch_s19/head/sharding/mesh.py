"""Device meshes: ``make_mesh(data=, fsdp=, tensor=)`` and a multi-host ``initialize_distributed`` wrapper.

Mesh axis names (``MESH_AXES``) appear only inside ``sharding/``; model code names logical axes and
``rules.py`` maps them to these mesh axes.

Axis order is (data, fsdp, tensor): ``tensor`` is the fastest-varying axis, so tensor-parallel groups are
neighbouring devices (one host, NVLink) and data-parallel groups span hosts.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)


class MeshError(ValueError):
    """A mesh that cannot be built or does not fit a model; the message says what was asked and what is allowed."""


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, **kwargs) -> None:
    """Starts JAX's multi-process runtime; call once per process before ``make_mesh`` (then ``jax.devices()``
    lists every process's devices and ``make_mesh`` spans them all).

    Arguments are passed to ``jax.distributed.initialize``. With none given, a process started by
    ``sharding.launch`` (several processes on one host) takes the coordinator, process count, process id and,
    on GPUs, its one local device from the launcher's environment; otherwise JAX auto-detects SLURM, Open MPI,
    Cloud TPU and Kubernetes jobs. A no-op when the runtime is already up or when a single process is asked
    for (``num_processes == 1``). Tested as several processes on one host (CPU, gloo); not across machines.
    """
    from . import launch

    env = os.environ
    if coordinator_address is None and num_processes is None and process_id is None and launch.ENV_COORDINATOR in env:
        coordinator_address = env[launch.ENV_COORDINATOR]
        num_processes, process_id = int(env[launch.ENV_NUM_PROCESSES]), int(env[launch.ENV_PROCESS_ID])
        if launch.ENV_LOCAL_DEVICE_IDS in env:
            kwargs.setdefault("local_device_ids", [int(i) for i in env[launch.ENV_LOCAL_DEVICE_IDS].split(",")])
    if num_processes == 1:
        return
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, **kwargs)


def make_mesh(*, data: int = 1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over the first ``data * fsdp * tensor`` devices (all hosts' devices after
    ``initialize_distributed``). Raises ``MeshError`` when a degree is not a positive integer or more
    devices are asked for than exist.
    """
    sizes = {DATA: data, FSDP: fsdp, TENSOR: tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise MeshError(f"{name}={size!r} must be a positive integer")
    devices = list(jax.devices() if devices is None else devices)
    need = data * fsdp * tensor
    if need > len(devices):
        raise MeshError(f"mesh data={data} x fsdp={fsdp} x tensor={tensor} needs {need} devices; only "
                        f"{len(devices)} present ({devices[0].platform})")
    if need < len(devices) and jax.process_count() > 1:
        raise MeshError(f"multi-host meshes must use every device: asked for {need}, {len(devices)} present")
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    if jax.process_count() > 1:  # process-major device order: tensor groups stay inside one host
        return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=axis_types, devices=devices)
    grid = np.array(devices[:need], dtype=object).reshape(data, fsdp, tensor)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
    return {name: int(size) for name, size in mesh.shape.items()}
