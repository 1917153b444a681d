import sys, numpy as np
sys.path.insert(0, '.')
from experiments import tune_paged_attention as t
rng = np.random.default_rng(1)
for (b, ctx, q) in ((32, 8192, True), (32, 2048, False)):
    extra = dict(int8_qk=True) if q else {}
    cands = [dict(num_splits=s, pages_per_block=p, num_warps=1, num_stages=st, prefetch_ids=True, row_gather=True, **extra)
             for s in (4, 8) for p in (2, 4, 8) for st in (2, 3)]
    best = t.time_decode(rng, b, ctx, 16, q, cands)
    print("BEST warps1", b, ctx, q, best, flush=True)
