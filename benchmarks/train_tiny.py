"""Train a small NSA transformer on long-range associative recall: the training proof.

Task (multi-query needle retrieval): a sequence of random filler tokens hides one "needle" per
needle kind (16 kinds), each carrying a random value, anywhere in the context; the last tokens are
queries, one per kind, and the model must output the value of that kind's needle. The needle can be
anywhere in the sequence, so the answer needs long-range attention (the selection branch has to
find the needle's block). Chance loss is ln(values).

Curriculum: the context starts at --start-len and doubles every --grow-every steps up to --seq-len
(from scratch, the needle-finding phase transition comes later the longer the context); every
step after that trains at --seq-len, and the reported final loss / accuracy are at --seq-len.

From one set of initial weights:
  1. comparison: the reference path (the PyTorch oracle, float32) and the kernel path
     (NativeSparseAttention on the compiled kernels, bf16 autocast) each train --compare-steps
     steps on the same batches at --seq-len; their loss curves are compared step by step;
  2. training: the kernel path trains --steps steps with the curriculum, then is evaluated on
     held-out batches at --seq-len.
Writes <out>/train_tiny.json (both curves, accuracy, timings, GPU) and <out>/train_tiny.png.

    python benchmarks/train_tiny.py --steps 400 --seq-len 4096
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from nsa_codegen import CompressionBranch, NativeSparseAttention, NSASpec, SelectionBranch, WindowBranch


class Block(nn.Module):
    """A pre-norm transformer block around an attention module x [B, T, hidden] -> [B, T, hidden]
    (also benchmarks/bench_recall.py's, with dense or sliding-window attention in its place)."""

    def __init__(self, hidden: int, attn: nn.Module):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class RecallModel(nn.Module):
    """Inputs are (token id, value id) per position; value id `values` = none, `values + 1` = query."""

    def __init__(self, tokens: int, values: int, hidden: int, layers: int, spec: NSASpec, backend: str):
        super().__init__()
        self.key_emb = nn.Embedding(tokens, hidden)
        self.val_emb = nn.Embedding(values + 2, hidden)
        self.blocks = nn.ModuleList(Block(hidden, NativeSparseAttention(hidden, spec, backend=backend))
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, values)

    def forward(self, key_ids, val_ids):
        x = self.key_emb(key_ids) + self.val_emb(val_ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def make_batch(gen, batch, seq_len, kinds, filler, values, device):
    """tok_ids, val_ids [B, T]; targets [B, kinds] for the last `kinds` positions (the queries).

    Token ids 0..kinds-1 are needle kinds, kinds..kinds+filler-1 filler."""
    body = seq_len - kinds
    tok = torch.randint(kinds, kinds + filler, (batch, body), generator=gen)
    val = torch.full((batch, body), values)
    targets = torch.randint(0, values, (batch, kinds), generator=gen)
    for b in range(batch):
        where = torch.randperm(body, generator=gen)[:kinds]
        tok[b, where] = torch.arange(kinds)
        val[b, where] = targets[b]
    order = torch.stack([torch.randperm(kinds, generator=gen) for _ in range(batch)])
    tok_ids = torch.cat([tok, order], 1)
    val_ids = torch.cat([val, torch.full((batch, kinds), values + 1)], 1)
    return tok_ids.to(device), val_ids.to(device), torch.gather(targets, 1, order).to(device)


def warmup_cosine(opt, steps: int):
    """Linear warm-up over 50 steps, then cosine decay to 10% at the last step."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps))))


def run(model, batches, steps, lr, autocast_dtype, queries, log_every=25, label=""):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, steps)
    losses, accs, t0 = [], [], time.time()
    for step in range(steps):
        key_ids, val_ids, targets = batches(step)
        with torch.autocast("cuda", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(key_ids, val_ids)[:, -queries:]
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        accs.append((logits.argmax(-1) == targets).float().mean().item())
        if step % log_every == 0 or step == steps - 1:
            print(f"[{label}] step {step:4d}  loss {losses[-1]:.4f}  acc {accs[-1]:.3f}  "
                  f"({time.time() - t0:.1f} s)", flush=True)
    torch.cuda.synchronize()
    return losses, accs, time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--compare-steps", type=int, default=50)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--start-len", type=int, default=256)
    ap.add_argument("--grow-every", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--kinds", type=int, default=16, help="needle kinds = queries per sequence")
    ap.add_argument("--filler", type=int, default=256, help="filler vocabulary")
    ap.add_argument("--values", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("train_tiny needs a CUDA GPU (the kernel path); see tests/test_layer.py for CPU training")
    spec = NSASpec(heads=8, kv_heads=1, head_dim=64, v_head_dim=64, dtype="bfloat16",
                   compression=CompressionBranch(32, 16, "mlp"), selection=SelectionBranch(64, 16, 1, 2),
                   window=WindowBranch(256))
    dev = "cuda"
    cache = {}
    # Compile (or load) every forward and backward kernel of the spec up front, in parallel.
    from nsa_codegen.cache import precompile
    from nsa_codegen.lowering import arch_of_capability, lower_to_plan
    arch = arch_of_capability(*torch.cuda.get_device_capability())
    failed = [r for r in precompile([c.key for c in lower_to_plan(spec, arch).all_calls]) if r[1]]
    if failed:
        raise SystemExit(f"kernels failed to compile: {failed}")

    def seq_len_at(step):
        return min(args.seq_len, args.start_len << (step // args.grow_every))

    def batches(step):  # the curriculum run
        if step not in cache:
            gen = torch.Generator().manual_seed(args.seed * 100003 + step)
            cache[step] = make_batch(gen, args.batch, seq_len_at(step), args.kinds, args.filler, args.values, dev)
        return cache[step]

    full = {}

    def full_batches(step):  # the comparison: --seq-len from the first step, the same data for both paths
        if step not in full:
            gen = torch.Generator().manual_seed(args.seed * 100003 + 50_000_000 + step)
            full[step] = make_batch(gen, args.batch, args.seq_len, args.kinds, args.filler, args.values, dev)
        return full[step]

    torch.manual_seed(args.seed)
    tokens = args.kinds + args.filler

    def model(backend):
        m = RecallModel(tokens, args.values, args.hidden, args.layers, spec, backend).to(dev)
        m.load_state_dict(init)
        return m

    init = RecallModel(tokens, args.values, args.hidden, args.layers, spec, "kernels").state_dict()
    # 1. Kernel path vs reference path: same initial weights, same batches at the full length.
    ref_losses, ref_accs, ref_s = run(model("reference"), full_batches, args.compare_steps, args.lr, None,
                                      args.kinds, label="reference fp32, compare")
    cmp_losses, _, cmp_s = run(model("kernels"), full_batches, args.compare_steps, args.lr, torch.bfloat16,
                               args.kinds, label="kernels bf16, compare")
    full.clear()
    torch.cuda.empty_cache()
    # 2. The training run on the kernel path (curriculum up to --seq-len).
    kern = model("kernels")
    losses, accs, kern_s = run(kern, batches, args.steps, args.lr, torch.bfloat16, args.kinds, label="kernels bf16")

    # Held-out batches at the full length (seeds no training step uses).
    kern.eval()
    ev_loss, ev_acc = [], []
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for i in range(4):
            gen = torch.Generator().manual_seed(10**9 + i)
            tok, val, tgt = make_batch(gen, args.batch, args.seq_len, args.kinds, args.filler, args.values, dev)
            logits = kern(tok, val)[:, -args.kinds:].float()
            ev_loss.append(nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten()).item())
            ev_acc.append((logits.argmax(-1) == tgt).float().mean().item())
    n = args.compare_steps
    rel = [abs(a - b) / abs(b) for a, b in zip(cmp_losses, ref_losses)]
    chance = math.log(args.values)
    tail = losses[-20:]
    result = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        "spec": spec.to_dict(), "args": vars(args), "chance_loss": chance,
        "kernel_loss": losses, "kernel_acc": accs,
        "compare_kernel_loss": cmp_losses, "compare_reference_loss": ref_losses, "compare_reference_acc": ref_accs,
        "max_rel_diff_first_steps": max(rel), "final_loss_mean_last20": sum(tail) / len(tail),
        "final_acc_mean_last20": sum(accs[-20:]) / len(accs[-20:]),
        "heldout_loss": sum(ev_loss) / len(ev_loss), "heldout_acc": sum(ev_acc) / len(ev_acc),
        "seq_len_per_step": [seq_len_at(i) for i in range(args.steps)],
        "first_step_at_full_length": next(i for i in range(args.steps + 1) if i == args.steps or
                                          seq_len_at(i) == args.seq_len),
        "kernel_seconds": kern_s, "reference_seconds": ref_s,
        "kernel_ms_per_step": 1e3 * kern_s / args.steps,
        "compare_kernel_ms_per_step": 1e3 * cmp_s / n, "compare_reference_ms_per_step": 1e3 * ref_s / n,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_tiny.json").write_text(json.dumps(result, indent=1))
    print(f"chance loss {chance:.3f}; final loss (mean of last 20) {result['final_loss_mean_last20']:.4f}, "
          f"accuracy {result['final_acc_mean_last20']:.3f}; held-out at T={args.seq_len}: loss "
          f"{result['heldout_loss']:.4f}, accuracy {result['heldout_acc']:.3f}; first {n} steps: max |kernel - reference| / "
          f"reference loss = {max(rel):.4%}; at T={args.seq_len}: {result['compare_kernel_ms_per_step']:.1f} "
          f"ms/step (kernels) vs {result['compare_reference_ms_per_step']:.1f} ms/step (reference)")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
        ax.plot(losses, label="nsa-codegen kernels (bf16)")
        ax.axhline(chance, color="gray", linestyle=":", label="chance")
        for i in range(1, args.steps):
            if seq_len_at(i) != seq_len_at(i - 1):
                ax.axvline(i, color="lightgray", linewidth=0.8)
        ax.set_xlabel(f"step (context {args.start_len} doubling every {args.grow_every} steps to {args.seq_len})")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.set_title(f"needle retrieval training ({torch.cuda.get_device_name()})")
        ax.legend()
        bx.plot(cmp_losses, label="kernels (bf16)")
        bx.plot(ref_losses, label="PyTorch reference (fp32)", linestyle="--")
        bx.set_xlabel(f"step (T={args.seq_len} from step 0, same init and batches)")
        bx.set_ylabel("loss")
        bx.set_title(f"kernel vs reference path: max rel diff {max(rel):.3%}")
        bx.legend()
        fig.tight_layout()
        fig.savefig(out / "train_tiny.png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no PNG written")
    return result


if __name__ == "__main__":
    main()
