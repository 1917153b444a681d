"""One process of a multi-process run (started by ``sharding.launch`` in tests/test_sharding_multiprocess.py).

Joins the distributed runtime from the launcher's environment, shards the tiny model (random weights, seed 0)
tensor-parallel over every process's devices, generates greedily (``generate``, then the paged engine ``LLM`` on
the same mesh) and writes ``<out>/p<process>.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [42]]
NEW_TOKENS = 8


def main(out: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages
    import jax

    from sharding import initialize_distributed, make_mesh, shard_model

    initialize_distributed()
    import autoglm_jax as ag
    from autoglm_jax.config import GLMConfig
    from autoglm_jax.loading import random_model

    model = random_model(GLMConfig.from_preset("tiny"), dtype="float32", seed=0)
    sharded = shard_model(model, make_mesh(tensor=jax.device_count()))
    tokens = ag.generate(sharded, PROMPTS, ag.GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=()))
    llm = ag.LLM(model, mesh=make_mesh(tensor=jax.device_count()), page_size=16, max_num_seqs=4)
    engine = [o.token_ids for o in llm.generate(PROMPTS, ag.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))]
    result = {"engine_tokens": engine, "process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
              "local_devices": jax.local_device_count(), "tokens": tokens}
    Path(out, f"p{jax.process_index()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
