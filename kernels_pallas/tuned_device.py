"""Which device's rows of a tuned table serve the device in hand.

Every tuned table (``kernels_pallas/tuned/*.json``) keys its rows by the device they were timed on, as the full
``device_kind`` ("NVIDIA H100 80GB HBM3") or its short key ("h100"). ``device_key`` maps both to the short key, and
``rows_for`` picks the rows of this device, or, where it has none, a sibling's: the H200 is the H100's processor
(SM90, the same multiprocessors, clocks and shared memory) with more and faster HBM (4.8 against 3.35 TB/s on the
datasheets), so the H100's tiles are the measured starting point on an H200 until a tuning script writes rows of its
own there (which then win). A device with neither gets no rows: each table's caller then takes its defaults.
"""

from __future__ import annotations

from typing import Callable, Iterable

# short key -> the keys whose rows it takes, in order, when it has none of its own (the same chip only)
SIBLINGS = {"h200": ("h100",), "h100": ("h200",)}
KNOWN = ("h100", "h200", "a100", "l4")


def device_key(device_kind: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100', 'NVIDIA H200' -> 'h200', 'h100' -> 'h100'; unknown kinds are lower-cased
    with spaces removed."""
    kind = device_kind.lower()
    return next((key for key in KNOWN if key in kind), kind.replace(" ", ""))


def rows_for(rows: Iterable, device_kind: str, device: Callable = lambda row: row["device"]) -> list:
    """The rows timed on ``device_kind`` (matched by ``device_key``), else those of its first sibling that has any,
    else []. ``device(row)``: the row's device field."""
    rows = list(rows)
    key = device_key(device_kind)
    for candidate in (key,) + SIBLINGS.get(key, ()):
        mine = [row for row in rows if device_key(device(row)) == candidate]
        if mine:
            return mine
    return []
