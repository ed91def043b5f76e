"""benchmarks/bench_paper.py's estimate of a step on a trained model's lists (CPU: a pure function of
the timed rows)."""


def test_trained_estimate_swaps_the_selection_kernels_times(load_script):
    bench_paper = load_script("benchmarks/bench_paper.py")
    ms = {"ours": 4.6, "k:selection_fwd[resolved]": 2.7, "k:selection_fwd[trained-L0]": 1.5,
          "k:selection_fwd[trained-L1]": 1.7, "k:selection_fwd[trained-L2]": 1.6, "ours_fb": 19.0,
          "k:selection_bwd[resolved]": 9.8, "k:selection_bwd[trained-L0]": 7.0, "k:selection_bwd[trained-L1]": 8.0,
          "k:selection_bwd[trained-L2]": 9.0, "dense_cudnn_d128": 1.84, "dense_cudnn_d128_fb": 7.5}
    rows = [dict(T=8192, case=c, median_ms=v) for c, v in ms.items()] + [dict(T=65536, case="ours", median_ms=50.0)]
    lines = bench_paper.trained_estimates(rows)
    (est,) = [x for x in lines if x.startswith("- T=")]   # 65536 has no trained cases: no line
    assert "forward 3.50 ms" in est            # 4.6 - 2.7 + median(1.5, 1.6, 1.7)
    assert "forward + backward 16.10 ms" in est   # 19.0 - 2.7 + 1.6 - 9.8 + median(7, 8, 9)
    assert "0.47x dense; forward 0.53x dense" in est and bench_paper.trained_estimates(rows[-1:]) == []
