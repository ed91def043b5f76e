"""Continuous batching over a paged NSA cache: requests of different lengths join while others are
generating and leave when done, their pages reused; a few decode several tokens per step (as a
speculative decoder verifies drafts).

    python examples/continuous_batching.py [--requests 12] [--device cpu]

Each request is a prompt x [1, P, hidden] and a list of decode chunks [1, s, hidden] (s = 1, or
2-3 for a verify step); the token embeddings are random (no sampling), so each request's outputs
can be checked against one forward over its whole sequence, which `main` does. On CUDA the layer
decodes a paged cache through the reference (the decode kernels read contiguous caches only).
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nsa_codegen import NativeSparseAttention, NSASpec  # noqa: E402


def make_requests(n: int, hidden: int, seed: int = 0, device="cpu", dtype=torch.float32):
    """n requests: prompts of 1..300 tokens, 2..12 decode chunks, every third with 2-3 token chunks."""
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for i in range(n):
        P = int(torch.randint(1, 300, (1,), generator=g))
        steps = int(torch.randint(2, 13, (1,), generator=g))
        sizes = [int(torch.randint(2, 4, (1,), generator=g)) if i % 3 == 2 else 1 for _ in range(steps)]
        rn = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
        reqs.append(dict(id=i, prompt=rn(1, P, hidden), chunks=[rn(1, s, hidden) for s in sizes]))
    return reqs


def serve(layer: NativeSparseAttention, requests: list, cache, max_batch: int = 4, stats: dict | None = None) -> dict:
    """Run every request to completion; returns {request id: [y_prompt, y_chunk0, ...]} (each
    [1, s, hidden]). A request is admitted when a slot and the pages for its whole sequence are free
    (reserved up front, so no running request ever waits for a page); each step decodes every running
    request once, those with the same chunk length in one batch; finished ones leave. stats, if
    given, receives the most requests running at once, the steps and the batches run."""
    stats = {} if stats is None else stats
    stats.update(max_running=0, steps=0, batches=0)
    pending = collections.deque(requests)
    running = {}                         # slot -> [request, next chunk]
    reserved = 0                         # pages promised to running requests and not yet taken
    outputs = {}
    P = cache.page_size

    def pages(req):
        return -(-(req["prompt"].shape[1] + sum(c.shape[1] for c in req["chunks"])) // P)

    while pending or running:
        while pending and len(running) < max_batch and pages(pending[0]) <= cache.free_pages - reserved:
            req = pending.popleft()
            slot = cache.add_sequence()
            with torch.no_grad():
                outputs[req["id"]] = [layer.prefill(req["prompt"], cache.batch([slot]))]
            reserved += pages(req) - -(-req["prompt"].shape[1] // P)
            running[slot] = [req, 0]
        if not running:
            raise RuntimeError(f"request {pending[0]['id']} needs {pages(pending[0])} pages, the pool has "
                               f"{cache.free_pages}")
        stats["max_running"] = max(stats["max_running"], len(running))
        stats["steps"] += 1
        by_len = collections.defaultdict(list)
        for slot, (req, i) in running.items():
            by_len[req["chunks"][i].shape[1]].append(slot)
        for s, slots in by_len.items():
            x = torch.cat([running[sl][0]["chunks"][running[sl][1]] for sl in slots])
            before = cache.free_pages
            stats["batches"] += 1
            with torch.no_grad():
                y = layer.decode(x, cache.batch(slots))
            reserved -= before - cache.free_pages
            for b, sl in enumerate(slots):
                req = running[sl][0]
                outputs[req["id"]].append(y[b:b + 1])
                running[sl][1] += 1
                if running[sl][1] == len(req["chunks"]):
                    cache.free_sequence(sl)
                    del running[sl]
    return outputs


def check(layer, requests, outputs) -> float:
    """Largest |difference| between the served outputs and one forward over each whole sequence."""
    worst = 0.0
    for req in requests:
        x = torch.cat([req["prompt"], *req["chunks"]], 1)
        with torch.no_grad():
            want = layer(x)
        got = torch.cat(outputs[req["id"]], 1)
        worst = max(worst, (got - want).abs().max().item())
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = NSASpec.from_dict(dict(heads=4, kv_heads=2, head_dim=32, v_head_dim=32, dtype="float32",
                                  compression=dict(block=16, stride=8, pool="mlp"),
                                  selection=dict(block=16, top_n=4), window=dict(size=32)))
    layer = NativeSparseAttention(64, spec, backend="reference").to(args.device)
    cache = layer.new_paged_cache(num_pages=48, page_size=16, max_seqs=4, max_seq_len=512, device=args.device,
                                  dtype=torch.float32)
    reqs = make_requests(args.requests, 64, device=args.device)
    out = serve(layer, reqs, cache)
    err = check(layer, reqs, out)
    print(f"{len(reqs)} requests served through {cache.kv_k.shape[0]} pages of {cache.page_size} tokens; "
          f"max |served - whole-sequence forward| = {err:.2e}; pages free at the end: {cache.free_pages}")
    return err


if __name__ == "__main__":
    main()
