"""Operator fusion: the same blocks jitted as one function vs run op by op (each op its own jit, every
intermediate materialized). Peak temporary memory, time, and the number of fusions XLA made; constant folding
on a small example.

    python experiments/fusion.py            # CPU here; on a GPU it writes fusion_<gpu>.json

Blocks (float32, M = B*T rows): RMSNorm + matmul; matmul + bias + GeLU; SwiGLU MLP (gate/up matmul, silu,
product, down matmul); attention softmax (q k^T, scale, causal mask, softmax, times v).

Memory: fused = arguments + outputs + temp of the one executable (``memory_analysis``). Op by op = the peak
over the ops of (arrays alive at that op: every input still needed later, the op's output, its temp), with
the same arguments counted; "sum" adds every intermediate (what stays allocated if nothing is freed).
Time: median over reps, after warm-up, ``block_until_ready`` on the output.
Seed claim checked: fusion gives "about 30% lower peak memory".
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from experiments import bench_common  # noqa: E402
from experiments.bench_common import pyplot_or_none  # noqa: E402

RESULTS = REPO / "experiments" / "results"
_MASKED = -1e30


def rmsnorm(x, g):
    return g * x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5)


def blocks(m: int, d: int, f: int, n: int, t: int, h: int):
    """name -> (inputs {name: array spec}, ops [(out, fn, [input names])]). The last op's output is the result."""
    sd = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    return {
        "rmsnorm_matmul": ({"x": sd(m, d), "g": sd(d), "w": sd(d, d)}, [
            ("sq", lambda x: x * x, ["x"]),
            ("ms", lambda s: jnp.mean(s, axis=-1, keepdims=True), ["sq"]),
            ("inv", lambda s: jax.lax.rsqrt(s + 1e-5), ["ms"]),
            ("xn", lambda x, i: x * i, ["x", "inv"]),
            ("xg", lambda x, g: x * g, ["xn", "g"]),
            ("y", lambda x, w: x @ w, ["xg", "w"])]),
        "matmul_bias_gelu": ({"x": sd(m, d), "w": sd(d, f), "b": sd(f)}, [
            ("xw", lambda x, w: x @ w, ["x", "w"]),
            ("xb", lambda a, b: a + b, ["xw", "b"]),
            ("y", lambda a: jax.nn.gelu(a, approximate=True), ["xb"])]),
        "swiglu_mlp": ({"x": sd(m, d), "wgu": sd(d, 2 * f), "wd": sd(f, d)}, [
            ("gu", lambda x, w: x @ w, ["x", "wgu"]),
            ("gate", lambda a: a[:, :f], ["gu"]),
            ("up", lambda a: a[:, f:], ["gu"]),
            ("act", lambda g: jax.nn.silu(g), ["gate"]),
            ("prod", lambda a, u: a * u, ["act", "up"]),
            ("y", lambda p, w: p @ w, ["prod", "wd"])]),
        "attention_softmax": ({"q": sd(n, t, h), "k": sd(n, t, h), "v": sd(n, t, h)}, [
            ("s", lambda q, k: jnp.einsum("nth,nsh->nts", q, k), ["q", "k"]),
            ("ss", lambda s: s * (h ** -0.5), ["s"]),
            ("sm", lambda s: jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, _MASKED), ["ss"]),
            ("mx", lambda s: jnp.max(s, axis=-1, keepdims=True), ["sm"]),
            ("e", lambda s, mx: jnp.exp(s - mx), ["sm", "mx"]),
            ("z", lambda e: jnp.sum(e, axis=-1, keepdims=True), ["e"]),
            ("p", lambda e, z: e / z, ["e", "z"]),
            ("y", lambda p, v: jnp.einsum("nts,nsh->nth", p, v), ["p", "v"])]),
    }


def nbytes(a) -> int:
    return int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize


def fused_fn(ops):
    def f(**inputs):
        env = dict(inputs)
        for out, fn, ins in ops:
            env[out] = fn(*[env[i] for i in ins])
        return env[ops[-1][0]]
    return f


def count_fusions(hlo_text: str) -> dict:
    kinds = re.findall(r"\bfusion\([^)]*\)[^\n]*kind=(k\w+)", hlo_text)
    calls = len(re.findall(r"^\s*%?\S*fused_computation\S*\s.*\{\s*$", hlo_text, re.M)) or len(
        re.findall(r"fused_computation[\w.\-]*\s*\(", hlo_text))
    out = {"fusion_instructions": len(kinds), "fused_computations": calls}
    for k in sorted(set(kinds)):
        out[k] = kinds.count(k)
    return out


def run_block(name, specs, ops, reps):
    names = list(specs)
    fused = jax.jit(lambda *a: fused_fn(ops)(**dict(zip(names, a))))
    c = fused.lower(*specs.values()).compile()
    ma = c.memory_analysis()
    fused_peak = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes
    fusions = count_fusions(c.as_text())

    # Op by op: each op its own executable.
    env_spec = dict(specs)
    op_execs = []
    for out, fn, ins in ops:
        j = jax.jit(fn)
        ci = j.lower(*[env_spec[i] for i in ins]).compile()
        env_spec[out] = jax.eval_shape(fn, *[env_spec[i] for i in ins])
        op_execs.append((out, j, ins, ci.memory_analysis().temp_size_in_bytes))
    last_use = {}
    for idx, (_, _, ins, _) in enumerate(op_execs):
        for i in ins:
            last_use[i] = idx
    arg_bytes = sum(nbytes(s) for s in specs.values())
    live = {k: nbytes(v) for k, v in specs.items()}  # arguments stay alive (the caller owns them)
    peak = 0
    for idx, (out, _, ins, temp) in enumerate(op_execs):
        peak = max(peak, sum(live.values()) + nbytes(env_spec[out]) + temp)
        live[out] = nbytes(env_spec[out])
        for i in ins:
            if i not in specs and last_use[i] == idx:
                live.pop(i)
    total_sum = arg_bytes + sum(nbytes(env_spec[o]) + t for o, _, _, t in op_execs)

    rng = np.random.default_rng(0)
    arrays = [jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.1) for s in specs.values()]

    def op_by_op(*a):
        env = dict(zip(names, a))
        for out, j, ins, _ in op_execs:
            env[out] = j(*[env[i] for i in ins])
        return env[ops[-1][0]]

    np.testing.assert_allclose(np.asarray(op_by_op(*arrays)), np.asarray(fused(*arrays)), rtol=2e-3, atol=2e-3)
    t_fused = bench_common.time_fn(fused, *arrays, warmup=1, reps=reps)
    t_ops = bench_common.time_fn(op_by_op, *arrays, warmup=1, reps=reps)
    return {"block": name, "ops": len(ops), "fused_peak_bytes": int(fused_peak), "fused_temp_bytes": int(ma.temp_size_in_bytes),
            "op_by_op_peak_bytes": int(peak), "op_by_op_sum_bytes": int(total_sum),
            "peak_reduction": 1 - fused_peak / peak, "fused_s": t_fused, "op_by_op_s": t_ops,
            "speedup": t_ops / t_fused, **fusions}


def _clean_hlo(text: str) -> str:
    """Only the computations, without metadata / stack-frame tables."""
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    lines, keep = [], False
    for line in text.splitlines():
        if re.match(r"^(ENTRY )?%?[\w.\-]+ .*\{$", line) or line.startswith("ENTRY"):
            keep = True
        if keep and line.strip():
            lines.append(line)
    return "\n".join(lines)


def constant_folding_example() -> dict:
    """Two tiny functions: ops on a literal constant array (XLA folds them into one constant) and the same
    arithmetic on an ``iota`` (XLA does not fold iota-rooted expressions; it fuses them into a loop instead)."""
    def literal(x):
        c = jnp.asarray(np.arange(8, dtype=np.float32))  # a literal constant in the HLO
        return x * (c * 2.0 + 1.0) + jnp.sum(jnp.exp(c * 0.1))

    def iota(x):
        c = jnp.arange(8, dtype=jnp.float32)  # an iota instruction
        return x * (c * 2.0 + 1.0) + jnp.sum(jnp.exp(c * 0.1))

    out = {}
    spec = jax.ShapeDtypeStruct((8,), jnp.float32)
    for name, fn in (("literal", literal), ("iota", iota)):
        lowered = jax.jit(fn).lower(spec)
        before, after = _clean_hlo(lowered.as_text(dialect="hlo")), _clean_hlo(lowered.compile().as_text())
        count = lambda t: len(re.findall(r"= \S+ (?:multiply|add|exponential|reduce)\(", t))
        out[name] = {"source": "x * (c * 2 + 1) + sum(exp(c * 0.1)), c = " +
                     ("np.arange(8) literal" if name == "literal" else "jnp.arange(8) (iota)"),
                     "hlo_before": before, "hlo_after": after, "arith_ops_before": count(before),
                     "arith_ops_after": count(after)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, default=2048, help="rows (B*T)")
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--f", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--t", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    rows = [run_block(name, specs, ops, args.reps)
            for name, (specs, ops) in blocks(args.m, args.d, args.f, args.heads, args.t, 128).items()]
    for r in rows:
        print(json.dumps(r), flush=True)
    backend, kind = jax.default_backend(), jax.devices()[0].device_kind
    name = "fusion" + ("" if backend == "cpu" else "_" + bench_common.gpu_tag())
    reductions = [r["peak_reduction"] for r in rows]
    doc = {"device": f"{backend}: {kind}", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"jax": jax.__version__, "python": platform.python_version()},
           "shapes": {"M": args.m, "D": args.d, "F": args.f, "N": args.heads, "T": args.t, "H": 128, "dtype": "float32"},
           "rows": rows, "constant_folding": constant_folding_example(),
           "summary": {"peak_reduction_min": min(reductions), "peak_reduction_max": max(reductions),
                       "peak_reduction_mean": float(np.mean(reductions)),
                       "seed_claim_30pct_holds_for": [r["block"] for r in rows if r["peak_reduction"] >= 0.25]}}
    bench_common.write_doc(args.out, name, doc, markdown(doc), plot=lambda path: plot(path, rows))


def markdown(doc) -> str:
    s = doc["shapes"]
    lines = [f"# Fusion: one jit vs op by op ({doc['device']}, {doc['date']})", "",
             f"float32, M={s['M']} rows, D={s['D']}, F={s['F']}; attention N={s['N']} heads, T={s['T']}, H={s['H']}.",
             "Peak = arguments + outputs + temporaries (fused: `memory_analysis()` of the one executable; op by op: "
             "the largest set of arrays alive at any op, each op's own temp included).", "",
             "| block | ops | fusions (by kind) | fused peak MiB | op-by-op peak MiB | op-by-op sum MiB | "
             "peak reduction | fused ms | op-by-op ms | speedup |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        kinds = ", ".join(f"{k} {r[k]}" for k in sorted(r) if k.startswith("k") and k[1:2].isupper())
        lines.append(f"| {r['block']} | {r['ops']} | {r['fusion_instructions']} ({kinds}) | "
                     f"{r['fused_peak_bytes'] / 2**20:.1f} | {r['op_by_op_peak_bytes'] / 2**20:.1f} | "
                     f"{r['op_by_op_sum_bytes'] / 2**20:.1f} | {100 * r['peak_reduction']:.0f}% | "
                     f"{1e3 * r['fused_s']:.2f} | {1e3 * r['op_by_op_s']:.2f} | {r['speedup']:.2f}x |")
    sm, rows = doc["summary"], doc["rows"]
    holds = sm["seed_claim_30pct_holds_for"]
    pct = lambda r: f"{r['block']} {100 * r['peak_reduction']:.0f}%"
    low = [r for r in rows if r["block"] not in holds]
    lines += ["", f"Seed claim \"about 30% lower peak memory\": measured peak reduction {100 * sm['peak_reduction_min']:.0f}% "
              f"to {100 * sm['peak_reduction_max']:.0f}% (mean {100 * sm['peak_reduction_mean']:.0f}%); "
              f">= 25% for {len(holds)} of {len(rows)} blocks: {', '.join(holds) or 'none'}.", "",
              f"Reading: the peak falls by >= 25% in {', '.join(pct(r) for r in rows if r['block'] in holds) or 'no block'}"
              f"; by less in {', '.join(pct(r) for r in low) or 'no block'}. A block's peak falls only where an "
              "intermediate that feeds elementwise work alone is no longer materialised (a pre-activation, softmax "
              "scores / exponentials). Where the block's largest live set is a library matmul's input or output "
              "(kCustom on CPU, cuBLAS on GPU), it is materialised either way, so fusion lowers the peak little or "
              "not at all. So \"about 30%\" is block-dependent, not a constant."
              + (" Times on a shared CPU are noisy." if doc["device"].startswith("cpu") else ""), ""]
    for name, cf in doc["constant_folding"].items():
        lines += [f"## Constant folding ({name}): `{cf['source']}`", "",
                  f"Arithmetic ops (multiply/add/exp/reduce): {cf['arith_ops_before']} before, "
                  f"{cf['arith_ops_after']} after.", "", "Before (lowered HLO):", "", "```", cf["hlo_before"], "```", "",
                  "After XLA optimisation (compiled HLO):", "", "```", cf["hlo_after"], "```", ""]
    return "\n".join(lines)


def plot(path: Path, rows) -> None:
    plt = pyplot_or_none()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["op_by_op_peak_bytes"] / 2**20 for r in rows], 0.4, label="op by op")
    ax.bar(x + 0.2, [r["fused_peak_bytes"] / 2**20 for r in rows], 0.4, label="one jit")
    for i, r in enumerate(rows):
        cut = round(100 * r["peak_reduction"])
        ax.text(i + 0.2, r["fused_peak_bytes"] / 2**20, f"-{cut}%" if cut else "0%", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(x, [r["block"] for r in rows], rotation=15)
    ax.set_ylabel("peak MiB (args + outputs + temps)")
    ax.set_title("Peak memory: op by op vs one jit (label: peak reduction)", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
