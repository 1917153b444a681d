"""Per-step device inputs built from a scheduler plan, padded to a few fixed shapes (buckets).

A step's shapes are (T tokens, B sequences, max_pages per sequence); they are rounded up to buckets so that
serving cycles through a small, enumerable set of compiled programs (``shape_keys``) and never recompiles
once they are warm:

* a decode-only step (every sequence feeds exactly one token) uses T = B, B a seq bucket (default: powers
  of two in ``MIN_SEQS..max_num_seqs``), so its tokens line up with its sequences (the decode kernel);
* any other step uses B = max_num_seqs and T a token bucket (default: powers of two in
  ``MIN_TOKENS..max_num_batched_tokens``);
* max_pages is a power of two in ``MIN_PAGES..max_pages_per_seq`` (the kernels read only the pages a
  sequence uses, so a larger table costs only its transfer).

Padding: tokens past the real ones have id 0, position 0 and slot -1 (their k/v is not written);
sequence rows past ``num_seqs`` have context length 0, an empty query range and the null page table.
Logits rows: one per sequence row (the last token of each sequence; padding rows point at token 0); only
rows of sequences with ``sample`` set are read back.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

MIN_TOKENS = 16
MIN_SEQS = 4
MIN_PAGES = 256


def bucket(n: int, lo: int, hi: int) -> int:
    """The smallest power of two >= max(n, lo), capped at ``hi`` (``hi`` itself need not be a power of two)."""
    if n > hi:
        raise ValueError(f"{n} exceeds the largest bucket {hi}")
    b = lo
    while b < n:
        b *= 2
    return min(b, hi)


def _powers(lo: int, hi: int) -> tuple[int, ...]:
    out, b = [], min(lo, hi)
    while b < hi:
        out.append(b)
        b *= 2
    return (*out, hi)


def _check_buckets(name: str, values, top: int) -> tuple[int, ...]:
    vals = tuple(sorted(set(int(v) for v in values)))
    if not vals or vals[0] < 1 or vals[-1] != top:
        raise ValueError(f"{name}={tuple(values)} must be positive sizes whose largest is {top}")
    return vals


@dataclasses.dataclass(frozen=True, kw_only=True)
class Buckets:
    """Padded sizes a step may take: tokens (T of a step that is not decode-only), seqs (B of a decode-only
    step), pages (max_pages). Each tuple is sorted and ends at the configured maximum."""

    tokens: tuple[int, ...]
    seqs: tuple[int, ...]
    pages: tuple[int, ...]
    max_num_seqs: int

    @classmethod
    def make(cls, *, max_num_batched_tokens: int, max_num_seqs: int, max_pages_per_seq: int,
             token_buckets=None, seq_buckets=None) -> "Buckets":
        """Defaults: powers of two from MIN_TOKENS / MIN_SEQS / MIN_PAGES up to the maxima."""
        t_top = max(max_num_batched_tokens, MIN_TOKENS)
        return cls(tokens=_check_buckets("token_buckets", token_buckets or _powers(MIN_TOKENS, t_top), t_top),
                   seqs=_check_buckets("seq_buckets", seq_buckets or _powers(MIN_SEQS, max_num_seqs), max_num_seqs),
                   pages=_powers(MIN_PAGES, max_pages_per_seq), max_num_seqs=max_num_seqs)

    @staticmethod
    def pick(values: tuple[int, ...], n: int) -> int:
        for v in values:
            if v >= n:
                return v
        raise ValueError(f"{n} exceeds the largest bucket {values[-1]}")

    def shape_keys(self, *, sampled: bool = True) -> list[tuple]:
        """Every (T, B, max_pages, decode_only, all_greedy) that ``build_step_inputs`` can produce."""
        greedy = (True, False) if sampled else (True,)
        keys = [(b, b, p, True, g) for b in self.seqs for p in self.pages for g in greedy]
        keys += [(t, self.max_num_seqs, p, False, g) for t in self.tokens for p in self.pages for g in greedy]
        return keys


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    token_ids: np.ndarray       # [T] int32
    positions: np.ndarray       # [T] int32
    slot_mapping: np.ndarray    # [T] int32, -1 = padding
    page_table: np.ndarray      # [B, max_pages] int32
    context_lens: np.ndarray    # [B] int32
    query_start: np.ndarray     # [B + 1] int32
    num_seqs: np.ndarray        # [1] int32
    logits_indices: np.ndarray  # [B] int32: packed index of each sequence's last token
    temperature: np.ndarray     # [B] float32 (0 = greedy)
    top_k: np.ndarray           # [B] int32
    top_p: np.ndarray           # [B] float32
    seeds: np.ndarray           # [B] uint32: per-request seed (the key is fold_in(key(seed), sample_index))
    sample_index: np.ndarray    # [B] int32: index of the output token being sampled
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))
    all_greedy: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @property
    def shape_key(self) -> tuple:
        """(T, B, max_pages, decode_only, all_greedy): one compiled step program per distinct key."""
        return (self.token_ids.shape[0], *self.page_table.shape, self.decode_only, self.all_greedy)


def build_step_inputs(plan, seeds: dict[str, int], buckets: Buckets) -> StepInputs:
    """Packs ``plan`` (a ``SchedulerOutput``) into padded host arrays. ``seeds`` maps request id -> seed."""
    reqs = plan.requests
    b_real = len(reqs)
    t_real = plan.num_scheduled_tokens
    decode_only = all(len(r.token_ids) == 1 for r in reqs)
    if decode_only:
        b_pad = t_pad = Buckets.pick(buckets.seqs, b_real)
    else:
        b_pad, t_pad = buckets.max_num_seqs, Buckets.pick(buckets.tokens, t_real)
    p_pad = Buckets.pick(buckets.pages, max(len(r.block_table) for r in reqs))

    token_ids = np.zeros(t_pad, np.int32)
    positions = np.zeros(t_pad, np.int32)
    slots = np.full(t_pad, -1, np.int32)
    token_ids[:t_real] = plan.flat_token_ids()
    positions[:t_real] = plan.flat_positions()
    slots[:t_real] = plan.flat_slot_mapping()
    page_table = np.zeros((b_pad, p_pad), np.int32)
    for i, r in enumerate(reqs):
        page_table[i, :len(r.block_table)] = r.block_table
    context_lens = np.zeros(b_pad, np.int32)
    context_lens[:b_real] = plan.seq_lens()
    query_start = np.full(b_pad + 1, t_real, np.int32)
    query_start[:b_real + 1] = plan.query_start_loc()
    logits_indices = np.zeros(b_pad, np.int32)
    logits_indices[:b_real] = np.asarray(query_start[1:b_real + 1]) - 1
    temperature = np.zeros(b_pad, np.float32)
    top_k = np.zeros(b_pad, np.int32)
    top_p = np.ones(b_pad, np.float32)
    seed_arr = np.zeros(b_pad, np.uint32)
    sample_index = np.zeros(b_pad, np.int32)
    for i, r in enumerate(reqs):
        sp = r.sampling_params
        temperature[i], top_k[i], top_p[i] = sp.temperature, sp.top_k, sp.top_p
        seed_arr[i] = seeds[r.request_id] & 0xFFFFFFFF
        sample_index[i] = r.sample_index
    all_greedy = not any(r.sample and r.sampling_params.temperature > 0 for r in reqs)
    return StepInputs(token_ids=token_ids, positions=positions, slot_mapping=slots, page_table=page_table,
                      context_lens=context_lens, query_start=query_start,
                      num_seqs=np.array([b_real], np.int32), logits_indices=logits_indices,
                      temperature=temperature, top_k=top_k, top_p=top_p, seeds=seed_arr,
                      sample_index=sample_index, decode_only=decode_only, all_greedy=all_greedy)



def empty_step_inputs(key: tuple) -> StepInputs:
    """Inputs of shape ``key`` with no sequences and no writes (for compiling ahead of traffic)."""
    t, b, p, decode_only, all_greedy = key
    zi = lambda *shape: np.zeros(shape, np.int32)
    return StepInputs(token_ids=zi(t), positions=zi(t), slot_mapping=np.full(t, -1, np.int32),
                      page_table=zi(b, p), context_lens=zi(b), query_start=zi(b + 1), num_seqs=zi(1),
                      logits_indices=zi(b), temperature=np.zeros(b, np.float32), top_k=zi(b),
                      top_p=np.ones(b, np.float32), seeds=np.zeros(b, np.uint32), sample_index=zi(b),
                      decode_only=decode_only, all_greedy=all_greedy)
