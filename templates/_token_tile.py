"""The token tile's block union, shared by the selection forward and the selection dq backward.

A program of the token-tile schedules handles BT consecutive tokens t0 .. t0+BT-1 of one KV head.
`union_builder(...)` returns a T.macro that, from BlockIndices [B, T, H, n] and SeqStart [B, T]
(block j of token t starts at key SeqStart[t] + j * block: the tokens of a tile may belong to
different sequences of a pack), fills in shared memory:
    Ent_s  [E]      entry e = (token e // n, slot e % n) -> its block's first key, -1 where unusable
                    for that token (a pad, a block after the token, a token past T)
    First_s [E]     1 where the entry is its block's first usable occurrence
    Blk_s  [E]      the union's first keys, ascending, each block once (the same for any slot order)
    Bias_s [E, BT]  union slot, token -> logit bias: -inf where the token did not choose the block,
                    log(count) / scale where it lists it count > 1 times (duplicates weigh as in
                    the reference), 0 for the usual single pick
    Num_s  [1]      the union size; 0 leaves one fully masked step over the tile's own block
and ends with a barrier, after which every thread copies Blk_s into its own registers Blk_r [E].
E = BT * n.

The K/V copies must take their block ids from Blk_r, not Blk_s. TileLang's sync pass cannot tell
a TMA write of K_s from a read of Blk_s (one dynamic shared buffer), so with Blk_s in the TMA
coordinates it puts a 128-thread named barrier between the TMA loads, inside the branch of the one
elected producer thread: the kernel hangs on the GPU (tests/test_codegen.py checks the generated
source for this).

`warp_uses_block(G)` returns the warp_skip schedules' test: whether a token of the calling
thread's warp chose a union block.

Codegen fingerprints hash this file with the templates that import it.
"""

import tilelang.language as T


def union_builder(BT: int, NSEL: int, BS: int, NT: int, scale: float):
    E = BT * NSEL
    acc = "float32"
    ninf = -T.infinity(acc)

    @T.macro
    def build_union(BlockIndices, SeqStart, b, h, t0, S, tx, Ent_s, First_s, Blk_s, Bias_s, Num_s, Blk_r):
        # Entry loops are T.Parallel, not `tx`-strided: on sm90 the pipeline pass adds a producer
        # warpgroup, so this prologue runs on NT + 128 threads, and TileLang drops a guard
        # `x < E` it can prove from `tx < NT` (E = NT: the extra threads then wrote past Ent_s,
        # corrupting First_s; wrong, run-to-run varying tiles at G = 8). T.Parallel is laid out
        # over the threads that really run it.
        # 1. The tile's entries; one is usable for its token only if it is a real block at or before it.
        for x in T.Parallel(E):
            Ent_s[x] = T.if_then_else(
                (t0 + x // NSEL < S)
                & (BlockIndices[b, T.min(t0 + x // NSEL, S - 1), h, x % NSEL] >= 0)
                & (BlockIndices[b, T.min(t0 + x // NSEL, S - 1), h, x % NSEL] * BS
                   <= t0 + x // NSEL - SeqStart[b, T.min(t0 + x // NSEL, S - 1)]),
                SeqStart[b, T.min(t0 + x // NSEL, S - 1)]
                + BlockIndices[b, T.min(t0 + x // NSEL, S - 1), h, x % NSEL] * BS, -1)
        T.sync_threads()
        # 2. First occurrences: an entry whose block no earlier entry holds.
        for x in T.Parallel(E):
            c = T.alloc_var("int32")
            c = 0
            for e in T.serial(E):
                c = c + T.if_then_else((Ent_s[e] == Ent_s[x]) & (e < x), 1, 0)
            First_s[x] = T.if_then_else((Ent_s[x] >= 0) & (c == 0), 1, 0)
        T.sync_threads()
        # 3. Each first occurrence takes its rank among the distinct blocks (so the union is
        #    ascending, the same for any slot order) and its tokens' biases.
        for x in T.Parallel(E):
            if First_s[x] == 1:
                rank = T.alloc_var("int32")
                rank = 0
                for e in T.serial(E):
                    rank = rank + T.if_then_else((First_s[e] == 1) & (Ent_s[e] < Ent_s[x]), 1, 0)
                Blk_s[rank] = Ent_s[x]
                for r in T.unroll(BT):
                    n = T.alloc_var("int32")
                    n = 0
                    for s in T.serial(NSEL):
                        n = n + T.if_then_else(Ent_s[r * NSEL + s] == Ent_s[x], 1, 0)
                    Bias_s[rank, r] = T.if_then_else(
                        n == 0, ninf, T.if_then_else(n == 1, 0, T.log(T.cast(n, acc)) / scale))
        T.sync_threads()
        if tx == 0:
            u = T.alloc_var("int32")
            u = 0
            for e in T.serial(E):
                u = u + First_s[e]
            Num_s[0] = u
            if u == 0:
                # Nothing usable: one fully masked step over the tile's own keys keeps the
                # pipelined loop non-empty; every row then ends with no visible key.
                Blk_s[0] = T.min(t0, S - 1)
                for r in T.unroll(BT):
                    Bias_s[0, r] = ninf
        T.sync_threads()
        for e in T.serial(E):
            Blk_r[e] = Blk_s[e]

    return build_union


def warp_uses_block(G: int):
    """warp_uses(Bias_s, it, tx): whether a token of tx's warp chose union block `it` (its bias is not
    -inf). With FullRow on mma.sync and one warp per 16 rows, warp w owns rows 16w .. 16w+15: the
    tokens 16w // G .. (16w + 15) // G of the tile (one token shared by G // 16 warps where G > 16).
    The value is warp-uniform. Call it where it is tested, never bind it to a name: TileLang would
    hoist the binding above the warp-specialized split, where the consumer threads' index is not yet
    remapped (selection_topn.token_of_tile says more)."""
    ninf = -T.infinity("float32")

    def warp_uses(Bias_s, it, tx):
        e = Bias_s[it, (tx // 32) * 16 // G] > ninf
        for k in range(1, max(1, 16 // G)):
            e = e | (Bias_s[it, (tx // 32) * 16 // G + k] > ninf)
        return e

    return warp_uses
