"""Runs ``autoglm ARGS`` with Python's ``sys.stdout`` sent to ``<out>/text<process>.txt`` (process id from
``sharding.launch``'s environment, 0 without it): what the CLI itself writes, apart from native libraries' output
on file descriptor 1 (gloo logs its connections there on CPU). Used by tests/test_sharding_multiprocess.py.

    python tests/cli_text_worker.py OUT_DIR generate --prompt ...
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages
    from autoglm_jax.cli import main
    from sharding.launch import ENV_PROCESS_ID

    out, argv = Path(sys.argv[1]), sys.argv[2:]
    with open(out / f"text{os.environ.get(ENV_PROCESS_ID, '0')}.txt", "w") as sys.stdout:
        code = main(argv)
    sys.exit(code)
