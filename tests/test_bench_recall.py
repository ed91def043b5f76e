"""benchmarks/bench_recall.py (MQAR: NSA vs dense vs sliding window) runs end to end on the CPU at a
tiny size and writes its md / json; the task's batches put every queried pair in the context."""
import json

import torch


def test_batches_hold_the_pairs_they_query(load_script):
    mod = load_script("benchmarks/bench_recall.py")
    ids, tgt = mod.make_batch(torch.Generator().manual_seed(0), 3, 200, 8, 64, 16, 32)
    assert ids.shape == (3, 200) and tgt.shape == (3, 8)
    for b in range(3):
        body, queries = ids[b, :-8].tolist(), ids[b, -8:].tolist()
        for key, value in zip(queries, tgt[b].tolist()):
            assert 16 <= key < 80 and 0 <= value < 16
            at = body.index(key)
            assert body[at + 1] == value and body.count(key) == 1


def test_tiny_run_writes_results(tmp_path, load_script):
    rows = load_script("benchmarks/bench_recall.py").main(["--tiny", "--out", str(tmp_path)])
    assert sorted({r["model"] for r in rows}) == ["dense", "nsa", "swa"]
    assert all(0 <= r["accuracy"] <= 1 and all(map(lambda x: x == x, r["losses"])) for r in rows)
    js = list(tmp_path.glob("*-recall.json"))
    md = list(tmp_path.glob("*-recall.md"))
    assert len(js) == 1 and len(md) == 1
    assert len(json.loads(js[0].read_text())["rows"]) == 3 and "| 128 |" in md[0].read_text()
