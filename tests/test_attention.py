"""Paged attention (KV in scattered pages, decode rows batched) against torch's causal SDPA on the
unpaged K/V of each whole sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bdlora_ray.attention import AttentionMeta, _decode_plan, _rows_plan, attend

NH, NKV, HD, BLOCK = 4, 2, 8, 4


# (tokens already cached, new rows): decodes of different context lengths, prefills, a chunk after a cache;
# then a step of decodes only (the plan built from the padded block tables), one at a page's last slot.
MIXED = [(0, 5), (6, 1), (1, 1), (13, 1), (0, 1), (7, 3), (30, 1)]
DECODES = [(6, 1), (1, 1), (13, 1), (0, 1), (30, 1), (3, 1), (15, 1)]


@pytest.mark.parametrize("seqs", [MIXED, DECODES], ids=["mixed", "decodes"])
def test_paged_step_of_decodes_and_prefills_equals_causal_attention_over_whole_sequences(seqs):
    g = torch.Generator().manual_seed(0)
    num_pages = 64
    kv = [torch.zeros(num_pages, 2, BLOCK, NKV, HD) for _ in range(2)]
    free = torch.randperm(num_pages, generator=g).tolist()  # pages scattered, out of order
    tables, full = [], []
    for cached, new in seqs:
        total = cached + new
        pages = [free.pop() for _ in range(-(-total // BLOCK))]
        tables.append(torch.tensor(pages, dtype=torch.int32))
        full.append([torch.randn(total, h, HD, generator=g) for h in (NH, NKV, NKV)])  # q, k, v
    for layer in range(2):
        for (cached, _), table, (_, k, v) in zip(seqs, tables, full):  # the context earlier steps wrote
            pos = torch.arange(cached)
            kv[layer][table.long()[pos // BLOCK], 0, pos % BLOCK] = k[:cached]
            kv[layer][table.long()[pos // BLOCK], 1, pos % BLOCK] = v[:cached]
    meta = AttentionMeta([n for _, n in seqs], [c for c, _ in seqs], tables, kv, BLOCK)
    new = lambda i: torch.cat([t[c:] for (c, _), t in zip(seqs, (f[i] for f in full))])  # noqa: E731
    # The reference knows nothing of pages or of this module: each whole sequence through torch's
    # causal SDPA, K/V heads repeated for their query heads; the rows this step added are compared.
    want = torch.cat([causal_sdpa(q, k, v)[c:] for (c, _), (q, k, v) in zip(seqs, full)])
    for layer in range(2):  # the second layer reuses the step's plan
        out = attend(new(0), new(1), new(2), meta, layer)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert "paged_plan" in meta.extra


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One whole sequence: q (n, nh, hd), k, v (n, nkv, hd) -> (n, nh, hd)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (n, nh, hd)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    return o.transpose(0, 1)  # (nh, n, hd) -> (n, nh, hd)


def test_unpaged_attention_of_several_sequences_equals_causal_sdpa_of_each():
    g = torch.Generator().manual_seed(1)
    lens = [5, 1, 9, 2]
    q, k, v = (torch.randn(sum(lens), h, HD, generator=g) for h in (NH, NKV, NKV))
    out = attend(q, k, v, AttentionMeta(lens), 0)
    want = torch.cat([causal_sdpa(*(t.split(lens)[i] for t in (q, k, v))) for i in range(len(lens))])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_a_step_of_decodes_plans_as_sequence_by_sequence():
    """The decode-only plan (tensor ops over the padded block tables) is the per-sequence plan, tensor
    for tensor: page tables of different lengths, with pages allocated ahead, scattered."""
    g = torch.Generator().manual_seed(1)
    cached = [0, 3, 4, 17, 9, 31, 2]
    free = torch.randperm(200, generator=g).tolist()
    tables = [torch.tensor([free.pop() for _ in range(c // BLOCK + 1 + extra)], dtype=torch.int32)
              for c, extra in zip(cached, [0, 2, 0, 1, 0, 3, 1])]
    meta = AttentionMeta([1] * len(cached), cached, tables, [torch.zeros(200, 2, BLOCK, NKV, HD)], BLOCK)
    fast, slow = _decode_plan(meta, torch.device("cpu")), _rows_plan(meta, torch.device("cpu"))
    for name in ("write_page", "write_slot", "decode_rows", "read_page", "read_slot", "read_mask"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert fast.prefill == slow.prefill == []
