"""Learning quality: multi-query associative recall (MQAR, Arora et al. 2023, "Zoology") at long
context, NSA against dense attention and sliding-window attention in the same model.

Task: `pairs` key-value pairs (keys from a key vocabulary, values from a value vocabulary) are
scattered over a context of T tokens of filler; the last `pairs` positions repeat the keys in a
random order (queries) and the model must output each key's value. Reaching a pair anywhere in the
context needs long-range attention; a sliding window of w tokens sees a pair only when it lies
within w of the query. Chance accuracy is 1 / values.

Models (everything but the attention is shared; same data, steps and seeds):
  nsa     NativeSparseAttention (compression l=32 d=16 MLP phi, selection l'=64 n=16, window --window):
          the compiled kernels on CUDA, the reference elsewhere
  dense   causal softmax attention (SDPA) with the same projections' sizes
  swa     NativeSparseAttention with only its window branch (w = --window, 256): sliding-window attention
Each model trains --steps steps per length and seed (AdamW, warm-up then cosine), then is scored
on --eval-batches held-out batches. Writes <out>/<date>-<device>-recall.{json,md,png}: accuracy vs
length (mean and min/max over seeds) and the loss curves.

    python benchmarks/bench_recall.py --lengths 1024 4096 16384 --seeds 0 1 2 --steps 600
    python benchmarks/bench_recall.py --tiny   # a CPU smoke run (CI: tests/test_bench_recall.py)
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import Block, warmup_cosine  # noqa: E402

from nsa_codegen import NativeSparseAttention, NSASpec  # noqa: E402


def nsa_spec(heads, head_dim, dtype, window_only=False, window=256):
    if window_only:
        return NSASpec(heads=heads, kv_heads=1, head_dim=head_dim, v_head_dim=head_dim, dtype=dtype,
                       compression=None, selection=None, window=dict(size=window))
    return NSASpec(heads=heads, kv_heads=1, head_dim=head_dim, v_head_dim=head_dim, dtype=dtype,
                   compression=dict(block=32, stride=16, pool="mlp"), selection=dict(block=64, top_n=16),
                   window=dict(size=window))


class DenseAttention(nn.Module):
    """Causal softmax attention with NativeSparseAttention's projection sizes (HQ query heads over
    one KV head). x [B, T, hidden] -> [B, T, hidden]."""

    def __init__(self, hidden, heads, head_dim):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.kv_proj = nn.Linear(hidden, 2 * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, T, 1, 2, self.head_dim).unbind(3)
        k, v = (t.transpose(1, 2).expand(B, self.heads, T, self.head_dim) for t in (k, v))
        o = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class RecallModel(nn.Module):
    def __init__(self, kind, vocab, values, hidden, layers, heads, head_dim, dtype, window):
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)

        def attn():
            if kind == "dense":
                return DenseAttention(hidden, heads, head_dim)
            return NativeSparseAttention(hidden, nsa_spec(heads, head_dim, dtype, window_only=kind == "swa",
                                                          window=window))
        self.blocks = nn.ModuleList(Block(hidden, attn()) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, values)

    def forward(self, ids):
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def make_batch(gen, batch, T, pairs, keys, values, filler):
    """ids [B, T], targets [B, pairs] (the values of the queried keys, in query order).

    Vocabulary: values 0..values-1, keys values..values+keys-1, filler after them. Each pair is a key
    token followed by its value token, at random non-overlapping places in the first T - pairs tokens."""
    body = T - pairs
    ids = torch.randint(values + keys, values + keys + filler, (batch, body), generator=gen)
    targets = torch.empty(batch, pairs, dtype=torch.long)
    queries = torch.empty(batch, pairs, dtype=torch.long)
    slots = body // 2
    for b in range(batch):
        k = torch.randperm(keys, generator=gen)[:pairs]
        v = torch.randint(0, values, (pairs,), generator=gen)
        at = torch.randperm(slots, generator=gen)[:pairs] * 2
        ids[b, at], ids[b, at + 1] = values + k, v
        order = torch.randperm(pairs, generator=gen)
        queries[b], targets[b] = values + k[order], v[order]
    return torch.cat([ids, queries], 1), targets


def train_one(kind, T, seed, args, device):
    torch.manual_seed(seed)
    model = RecallModel(kind, args.values + args.keys + args.filler, args.values, args.hidden, args.layers,
                        args.heads, args.head_dim, args.dtype, args.window).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    steps = args.steps
    sched = warmup_cosine(opt, steps)
    gen = torch.Generator().manual_seed(1000 * seed + T)
    amp = device == "cuda"
    losses, t0 = [], time.time()
    for step in range(steps):
        ids, tgt = make_batch(gen, args.batch, T, args.pairs, args.keys, args.values, args.filler)
        ids, tgt = ids.to(device), tgt.to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            logits = model(ids)[:, -args.pairs:]
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    train_s = time.time() - t0
    eval_gen = torch.Generator().manual_seed(10 ** 6 + 1000 * seed + T)
    hits = total = 0
    model.eval()
    with torch.no_grad():
        for _ in range(args.eval_batches):
            ids, tgt = make_batch(eval_gen, args.batch, T, args.pairs, args.keys, args.values, args.filler)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                pred = model(ids.to(device))[:, -args.pairs:].argmax(-1).cpu()
            hits += int((pred == tgt).sum())
            total += tgt.numel()
    return dict(model=kind, T=T, seed=seed, accuracy=hits / total, final_loss=sum(losses[-20:]) / len(losses[-20:]),
                losses=losses, train_s=train_s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=["nsa", "dense", "swa"], choices=["nsa", "dense", "swa"])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--keys", type=int, default=512)
    ap.add_argument("--values", type=int, default=64)
    ap.add_argument("--filler", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=256, help="NSA's window branch and the swa model's window")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="a CPU smoke run: T 128, 1 seed, 8 steps")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = "bfloat16" if device == "cuda" else "float32"
    if args.tiny:
        args.lengths, args.seeds, args.steps, args.batch, args.eval_batches = [128], [0], 8, 2, 1
        args.hidden, args.heads, args.head_dim, args.pairs, args.keys, args.window = 32, 16, 16, 4, 32, 32
    rows = []
    for T in args.lengths:
        for kind in args.models:
            for seed in args.seeds:
                r = train_one(kind, T, seed, args, device)
                rows.append(r)
                print(f"T={T:6d} {kind:5s} seed {seed}: accuracy {r['accuracy']:.3f}, final loss {r['final_loss']:.3f} "
                      f"({r['train_s']:.0f} s)", flush=True)
    save(args, rows, device)
    return rows


def save(args, rows, device):
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    stem = Path(args.out) / f"{date}-{gpu.replace(' ', '_')}-recall"
    stem.parent.mkdir(parents=True, exist_ok=True)
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_forward import run_info
        info = run_info({}) if device == "cuda" else {"device": "cpu"}
    except Exception as e:   # provenance must not lose the run's numbers
        info = {"run_info_error": repr(e)}
    cfg = {k: v for k, v in vars(args).items() if k != "out"}
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=dict(info, **cfg), rows=rows), indent=1))
    lines = [f"# MQAR recall, {gpu}, {date}", "",
             f"{args.pairs} pairs, {args.keys} keys, {args.values} values (chance {1 / args.values:.3f}), "
             f"{args.layers} layers x {args.hidden} hidden, {args.heads} heads x {args.head_dim}, {args.steps} steps "
             f"x batch {args.batch}, seeds {args.seeds}. Accuracy on {args.eval_batches} held-out batches: "
             "mean [min, max] over seeds.", "", "| T | " + " | ".join(args.models) + " |",
             "|---|" + "---|" * len(args.models)]
    for T in args.lengths:
        cells = []
        for m in args.models:
            acc = [r["accuracy"] for r in rows if r["T"] == T and r["model"] == m]
            cells.append(f"{sum(acc) / len(acc):.3f} [{min(acc):.3f}, {max(acc):.3f}]")
        lines.append(f"| {T} | " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for m in args.models:
            means = [sum(r["accuracy"] for r in rows if r["T"] == T and r["model"] == m) / len(args.seeds)
                     for T in args.lengths]
            a1.plot(args.lengths, means, marker="o", label=m)
            for r in rows:
                if r["model"] == m and r["T"] == args.lengths[-1]:
                    a2.plot(r["losses"], alpha=0.6, label=f"{m} seed {r['seed']}")
        a1.set_xscale("log", base=2)
        a1.set_xlabel("context T")
        a1.set_ylabel("accuracy")
        a1.legend()
        a2.set_xlabel("step")
        a2.set_ylabel(f"loss at T={args.lengths[-1]}")
        a2.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(stem.with_suffix(".png"), dpi=110)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
