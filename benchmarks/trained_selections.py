"""Selections of a trained model: how much neighbouring tokens' top-n lists share.

The token-tile selection kernels load the union of a few consecutive tokens' block lists, so their
speed depends on how much those lists agree. Random inputs to an untrained model pick blocks
almost independently per token (the `uniform` row of workloads); this script measures what a
model that has learned something picks.

1. Trains a small byte-level language model: an embedding, --layers pre-norm blocks around
   NativeSparseAttention with the paper's branch sizes (compression l=32, d=16, MLP phi; selection
   l'=64, n=16, the first block and the two latest forced; window 512), HQ=--heads over H=4 KV heads,
   no position encoding. Text: the Python standard library's sources on this machine (files in
   sorted order; the last 5% held out). --steps steps of --batch x --seq-len bytes, AdamW.
2. For each --eval-T: runs the model over held-out bytes and records every layer's block lists
   (`NativeSparseAttention.block_indices`: the lists its selection branch reads); reports the
   held-out loss in bits per byte, and per layer the mean union size of 1, 4, 8, 16 and 64
   consecutive tokens' lists (workloads.union_size) beside uniform and drift lists of the same shape.
3. Saves <out>/<stem>-lists.pt ({T: [layers, 1, T, 4, 16] int16}) for
   `bench_selection.py --lists-file`, and <out>/<stem>.{json,md}.

    python benchmarks/trained_selections.py --device cuda --steps 800 --eval-T 8192 65536
    python benchmarks/trained_selections.py --tiny       # a CPU smoke run (tests/test_trained_selections.py)
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import run_info  # noqa: E402
from train_tiny import Block, warmup_cosine  # noqa: E402

from nsa_codegen import NativeSparseAttention, NSASpec, workloads  # noqa: E402

H, SEL_BLOCK, TOP_N = 4, 64, 16
TILES = (1, 4, 8, 16, 64)


def spec_for(heads: int, head_dim: int, dtype: str) -> NSASpec:
    return NSASpec(heads=heads, kv_heads=H, head_dim=head_dim, v_head_dim=head_dim, dtype=dtype,
                   compression=dict(block=32, stride=16, pool="mlp"),
                   selection=dict(block=SEL_BLOCK, top_n=TOP_N, initial=1, local=2), window=dict(size=512))


def corpus(limit_bytes: int) -> tuple[torch.Tensor, dict]:
    """uint8 [N] bytes of the standard library's .py files (sorted paths, site-packages excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(root + "/**/*.py", recursive=True) if "site-packages" not in f)
    chunks, n = [], 0
    for f in files:
        b = Path(f).read_bytes()
        chunks.append(b + b"\n\n")
        n += len(b) + 2
        if n >= limit_bytes:
            break
    data = b"".join(chunks)[:limit_bytes]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone(), dict(root=root, files=len(chunks),
                                                                                bytes=len(data))


class ByteLM(nn.Module):
    """ids [B, T] (bytes) -> logits [B, T, 256]."""

    def __init__(self, hidden: int, layers: int, spec: NSASpec, backend: str):
        super().__init__()
        self.emb = nn.Embedding(256, hidden)
        self.blocks = nn.ModuleList(Block(hidden, NativeSparseAttention(hidden, spec, backend=backend))
                                    for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, 256)

    def forward(self, ids):
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def selections(model: ByteLM, ids: torch.Tensor, autocast: bool) -> tuple[float, torch.Tensor]:
    """Held-out loss (bits per byte) of ids [1, T] and every layer's block lists [layers, 1, T, H, n]."""
    lists = []
    hooks = [blk.attn.register_forward_hook(lambda m, inp, out: lists.append(m.block_indices(inp[0])))
             for blk in model.blocks]
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(ids[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten().long())
    return loss.item() / math.log(2), torch.stack(lists)


def unions(idx: torch.Tensor) -> dict:
    return {f"U{t}": workloads.union_size(idx, t) for t in TILES if t <= idx.shape[1]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=64, help="query heads (over 4 KV heads)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--max-train-seconds", type=float, default=None,
                    help="stop training after this long (the steps run are recorded)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-T", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--corpus-mb", type=float, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--watchdog", type=float, default=None,
                    help="dump every thread's Python stack each this many seconds (finding a hang)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long CPU run of the whole pipeline")
    args = ap.parse_args(argv)
    if args.tiny:
        args.device, args.hidden, args.layers, args.heads, args.steps = "cpu", 32, 2, 8, 3
        args.batch, args.seq_len, args.eval_T, args.corpus_mb = 1, 512, [2048], 0.5
    if args.watchdog:
        import faulthandler
        faulthandler.dump_traceback_later(args.watchdog, repeat=True)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(args.seed)
    data, source = corpus(int(args.corpus_mb * 2**20))
    held = max(max(args.eval_T) + 1, len(data) // 20)
    if len(data) < held + args.seq_len + 1:
        raise SystemExit(f"corpus of {len(data)} bytes is too small for --seq-len {args.seq_len} and "
                         f"--eval-T {max(args.eval_T)}: raise --corpus-mb")
    train, test = data[:-held], data[-held:]
    spec = spec_for(args.heads, args.head_dim, "bfloat16" if cuda else "float32")
    model = ByteLM(args.hidden, args.layers, spec, "auto").to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = warmup_cosine(opt, args.steps)
    gen = torch.Generator().manual_seed(args.seed)
    curve, t0 = [], time.time()
    for step in range(args.steps):
        at = torch.randint(0, len(train) - args.seq_len - 1, (args.batch,), generator=gen)
        ids = torch.stack([train[a:a + args.seq_len + 1] for a in at.tolist()]).to(dev).long()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        curve.append(loss.item() / math.log(2))
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d} {curve[-1]:.3f} bits/byte ({time.time() - t0:.0f} s)", flush=True)
        if args.max_train_seconds is not None and time.time() - t0 > args.max_train_seconds:
            print(f"step {step:5d} {curve[-1]:.3f} bits/byte: stopped at --max-train-seconds", flush=True)
            break
    train_s = time.time() - t0
    model.eval()
    counts = torch.bincount(train.long(), minlength=256).double()
    p = counts / counts.sum()
    unigram = -(p[p > 0] * p[p > 0].log2()).sum().item()
    evals, saved = [], {}
    for T in args.eval_T:
        print(f"eval T={T}", flush=True)
        ids = test[:T + 1].view(1, -1).to(dev).long()
        bpb, idx = selections(model, ids, cuda)
        saved[T] = idx.to(torch.int16).cpu()
        row = dict(T=T, bits_per_byte=bpb, layers=[unions(idx[i]) for i in range(idx.shape[0])])
        for kind, coh in (("uniform", 1), ("drift", 16), ("drift", 256)):
            ref_idx = workloads.block_indices(kind, 1, T, H, SEL_BLOCK, TOP_N, coherence=coh, seed=T, device=dev)
            row[f"{kind}{coh if kind == 'drift' else ''}"] = unions(ref_idx)
        evals.append(row)
        print(f"T={T}: {bpb:.3f} bits/byte; " + "; ".join(
            f"layer {i} U4 {u['U4']:.1f} U64 {u.get('U64', float('nan')):.1f}" for i, u in enumerate(row["layers"])),
            flush=True)
    info = run_info()
    stem = Path(args.out) / f"{info['date']}-{info['gpu'].replace(' ', '_')}-trained_selections"
    stem.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(lists=saved, H=H, block=SEL_BLOCK, top_n=TOP_N, spec=str(spec)),
               str(stem) + "-lists.pt")
    meta = dict(info, source=source, spec=str(spec), hidden=args.hidden, layers=args.layers, steps=args.steps,
                batch=args.batch, seq_len=args.seq_len, lr=args.lr, seed=args.seed, train_seconds=train_s, steps_run=len(curve),
                unigram_bits_per_byte=unigram)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, curve=curve, evals=evals), indent=1))
    stem.with_suffix(".md").write_text(report(meta, curve, evals))
    print(report(meta, curve, evals))


def report(meta, curve, evals) -> str:
    lines = [f"# Selections of a trained byte-level model, {meta['gpu']}, {meta['date']}", "",
             f"commit {meta['git_sha'][:12]} (dirty: {meta['git_dirty']}). Model: {meta['layers']} layers, hidden "
             f"{meta['hidden']}, {meta['spec']}; {meta['steps_run']} steps of {meta['batch']} x {meta['seq_len']} bytes "
             f"({meta['train_seconds']:.0f} s) of {meta['source']['bytes'] / 2**20:.1f} MiB of Python standard "
             f"library source. Final training loss {curve[-1]:.3f} bits/byte (unigram entropy "
             f"{meta['unigram_bits_per_byte']:.2f}).", "",
             "U<k>: mean number of distinct selection blocks in the lists of k consecutive tokens (per KV head, "
             "tiles aligned at multiples of k); a token's list holds 16 (the first block and the two latest "
             "forced). A token-tile kernel of k tokens loads U<k> blocks where the per-token kernel loads 16 k.", "",
             "| T | held-out bits/byte | lists | U1 | U4 | U8 | U16 | U64 |", "|---|---|---|---|---|---|---|---|"]
    for e in evals:
        rows = [(f"layer {i}", u) for i, u in enumerate(e["layers"])]
        rows += [(k, e[k]) for k in ("uniform", "drift16", "drift256")]
        for name, u in rows:
            cells = " | ".join(f"{u[f'U{t}']:.1f}" if f"U{t}" in u else "" for t in TILES)
            lines.append(f"| {e['T']} | {e['bits_per_byte']:.3f} | {name} | {cells} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
