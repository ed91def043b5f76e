"""benchmarks/trained_selections.py runs end to end on the CPU at a tiny size: it trains, records every
layer's block lists (the lists the layer's selection reads) and writes its md / json / lists."""
import json

import torch


def test_tiny_run_writes_lists_and_unions(tmp_path, load_script):
    mod = load_script("benchmarks/trained_selections.py")
    mod.main(["--tiny", "--out", str(tmp_path)])
    res = json.loads(next(tmp_path.glob("*-trained_selections.json")).read_text())
    (ev,) = res["evals"]
    assert ev["T"] == 2048 and len(ev["layers"]) == 2 and len(res["curve"]) == 3
    for u in ev["layers"] + [ev["uniform"], ev["drift16"]]:
        assert 8 <= u["U1"] <= 16 and u["U1"] <= u["U4"] <= u["U8"] <= u["U16"] <= u["U64"] <= 32
    lists = torch.load(next(tmp_path.glob("*-trained_selections-lists.pt")))["lists"][2048]
    assert lists.shape == (2, 1, 2048, 4, 16) and lists.dtype == torch.int16
    # the recorded lists are what the model's layers select: the same U4 recomputed from them
    from nsa_codegen import workloads
    assert abs(workloads.union_size(lists[1], 4) - ev["layers"][1]["U4"]) < 1e-9
    assert "| 2048 |" in next(tmp_path.glob("*-trained_selections.md")).read_text()
