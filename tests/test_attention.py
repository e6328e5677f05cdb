"""Paged attention (KV in scattered pages, decode rows batched) against plain causal attention."""

from __future__ import annotations

import torch

from bdlora_ray.attention import AttentionMeta, attend

NH, NKV, HD, BLOCK = 4, 2, 8, 4


def test_paged_step_of_decodes_and_prefills_equals_causal_attention_over_whole_sequences():
    g = torch.Generator().manual_seed(0)
    # (tokens already cached, new rows): decodes of different context lengths, prefills, a chunk after a cache
    seqs = [(0, 5), (6, 1), (1, 1), (13, 1), (0, 1), (7, 3), (30, 1)]
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
    for layer in range(2):  # the second layer reuses the step's plan
        out = attend(new(0), new(1), new(2), meta, layer)
        want = attend(*(torch.cat([f[i] for f in full]) for i in range(3)), AttentionMeta([c + n for c, n in seqs]), 0)
        rows, start = [], 0
        for c, n in seqs:
            rows += range(start + c, start + c + n)
            start += c + n
        torch.testing.assert_close(out, want[rows], rtol=1e-5, atol=1e-5)
    assert "paged_plan" in meta.extra
