"""``python -m autoglm_jax.server [args]`` is ``autoglm serve [args]``."""

import sys

from .main import serve_main

sys.exit(serve_main())
