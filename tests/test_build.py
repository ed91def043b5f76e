"""`nsa-codegen build` on the CPU (nvcc, no GPU): artifacts, idempotence, corruption, loading without nvcc."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nsa_codegen import NSASpec
from nsa_codegen.build import build, default_build_set, plan_keys
from nsa_codegen.prebuilt import artifact_ok
from nsa_codegen.cli import main

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
WINDOW_ONLY = NSASpec(heads=8, kv_heads=2, head_dim=64, v_head_dim=64, dtype="float16", compression=None,
                      selection=None, window={"size": 128})


def test_default_build_set_covers_the_issue_configs():
    specs = default_build_set()
    assert {"paper_bf16", "paper_fp16", "paper_d128_bf16", "fla_fp16", "g1_bf16", "g4_fp16", "seed_l256_bf16",
            "g6_bf16"} <= set(specs)
    assert specs["seed_l256_bf16"].compression.block == 256 and specs["g6_bf16"].group == 6
    assert specs["paper_bf16"].head_dim == 192 and specs["g1_fp16"].group == 1 and specs["g4_bf16"].group == 4
    keys = plan_keys(specs, "sm90")
    assert len({str(k) for k, _ in keys}) == len(keys) >= 20
    # The build covers the backward kernels unless told not to.
    kinds = {k.kind for k, _ in keys}
    assert {"selection_bwd_dkdv", "compression_bwd_dq", "window_bwd_dkdv", "gate_combine_bwd"} <= kinds
    assert not any("_bwd" in k.kind for k, _ in plan_keys(specs, "sm90", backward=False, decode=False))
    # and the one-token decode kernels of every spec with all three branches: the four of a contiguous
    # cache and the cmp / sparse kernels over 64-token pages
    decode = [k for k, _ in plan_keys(specs, "sm90") if k.kind.startswith("decode_")]
    full = sum(s.compression is not None and s.selection is not None and s.window is not None for s in specs.values())
    assert len(decode) == 6 * full and sum(k.kind.endswith("_paged") for k in decode) == 2 * full
    assert not any(k.kind.startswith("decode_") for k, _ in plan_keys(specs, "sm90", decode=False))


@needs_nvcc
@pytest.mark.compile
def test_build_is_idempotent_detects_corruption_and_loads_without_nvcc(tmp_path, capsys):
    out = tmp_path / "generated"
    # Forward kernels only, to keep this test short (the backward ones build the same way).
    r1 = build({"win": WINDOW_ONLY}, "sm90", out, jobs=1, backward=False, decode=False)
    assert [r.status for r in r1] == ["built", "built"], r1  # the window kernel and the gated sum
    key = plan_keys({"win": WINDOW_ONLY}, "sm90")[0][0]
    kdir = out / "sm90" / key.dirname
    meta = json.loads((kdir / "meta.json").read_text())
    assert meta["key"] == str(key) and meta["schedule_source"] in ("default", "tuned")
    assert meta["entry_function"] == "window_attention_fwd"
    assert "__global__" in (kdir / "kernel.cu").read_text()
    manifest = json.loads((out / "sm90" / "manifest.json").read_text())
    assert manifest["kernels"][key.problem_id]["key"] == str(key)
    assert "[" in capsys.readouterr().out  # the progress bar

    assert [r.status for r in build({"win": WINDOW_ONLY}, "sm90", out, jobs=1, backward=False, decode=False)] == ["up-to-date"] * 2

    lib = out / "sm90" / meta["artifact"]
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])  # a truncated artifact
    assert not artifact_ok(out / "sm90", key)
    rebuilt = build({"win": WINDOW_ONLY}, "sm90", out, jobs=1, backward=False, decode=False)
    assert sorted(r.status for r in rebuilt) == ["built", "up-to-date"]  # only the corrupt one
    assert artifact_ok(out / "sm90", key)

    # A fresh process with no nvcc on PATH resolves the prebuilt artifact.
    env = dict(os.environ, PATH="/usr/bin:/bin", NSA_CODEGEN_GENERATED_DIR=str(out))
    env.pop("CUDA_HOME", None)
    # get_kernel opens it through TVM-FFI: no compiler, and not even a TileLang import.
    code = ("import shutil, sys; assert shutil.which('nvcc') is None;"
            "from nsa_codegen.build import plan_keys; from nsa_codegen.prebuilt import find_prebuilt; from tests.test_build import WINDOW_ONLY;"
            "from nsa_codegen.cache import get_kernel; from nsa_codegen.lowering import lower_to_plan;"
            "ck = get_kernel(lower_to_plan(WINDOW_ONLY).calls[0].key); imported = 'tilelang' in sys.modules;"
            "k = plan_keys({'w': WINDOW_ONLY}, 'sm90')[0][0];"  # (checking templates imports TileLang)
            "print(find_prebuilt(k), ck.prebuilt, str(ck.key) == str(k), type(ck.kernel).__name__, imported)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(out / "sm90"), str(out / "sm90"), "True", "Function", "False"], r.stdout


@needs_nvcc
@pytest.mark.compile
def test_build_output_is_progress_only(tmp_path):
    """TileLang's logs and compiler warnings go to build.log, not between the progress lines."""
    cfg = tmp_path / "win.yaml"
    cfg.write_text(WINDOW_ONLY.to_yaml())
    r = subprocess.run([sys.executable, "-m", "nsa_codegen", "build", "--arch", "sm90", "--config", str(cfg),
                        "--out", str(tmp_path / "gen"), "--forward-only", "-j", "1"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr
    noise = [line for line in (r.stdout + r.stderr).splitlines()
             if "INFO" in line or "Warning" in line or "warning" in line]
    assert not noise, noise
    assert sum(line.startswith("[") for line in r.stdout.splitlines()) == 2   # one progress line a kernel
    log = (tmp_path / "gen" / "sm90" / "build.log").read_text()
    assert log.count("--- sm90/") == 2


def test_schedule_variants_add_keys_of_their_kind():
    spec = {"paper": default_build_set()["paper_bf16"]}
    base = plan_keys(spec, "sm90", backward=False, decode=False)
    more = plan_keys(spec, "sm90", backward=False, decode=False,
                     variants={"selection_fwd": [{"tile_tokens": 0}, {"tile_tokens": 1}]})
    extra = [(k, src) for k, src in more if (k, src) not in base]
    sel = next(k for k, _ in base if k.kind == "selection_fwd")
    want = {0, 1} - {dict(sel.schedule)["tile_tokens"]}   # the resolved schedule is not built twice
    assert sorted(dict(k.schedule)["tile_tokens"] for k, _ in extra) == sorted(want)
    assert all(src == "variant" and k.problem_id == sel.problem_id for k, src in extra)
    with pytest.raises(ValueError, match="tile_tokens"):
        plan_keys(spec, "sm90", backward=False, decode=False, variants={"selection_fwd": [{"tile_tokens": 3}]})


@needs_nvcc
@pytest.mark.compile
def test_variant_builds_and_loads_without_a_compiler(tmp_path, monkeypatch):
    out = tmp_path / "generated"
    r = build({"win": WINDOW_ONLY}, "sm90", out, jobs=1, backward=False, decode=False,
              variants={"window_fwd": [{"num_stages": 3}]})
    assert sorted(x.schedule_source for x in r if x.status == "built") == ["default", "default", "variant"], r
    key = next(k for k, src in plan_keys({"win": WINDOW_ONLY}, "sm90", variants={"window_fwd": [{"num_stages": 3}]})
               if src == "variant")
    manifest = json.loads((out / "sm90" / "manifest.json").read_text())
    assert str(key) in manifest["variants"] and manifest["kernels"][key.problem_id]["key"] != str(key)
    monkeypatch.setenv("NSA_CODEGEN_GENERATED_DIR", str(out))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")   # no nvcc: it must come from generated/
    from nsa_codegen.cache import load_scheduled
    ck = load_scheduled(key)
    assert ck.prebuilt == out / "sm90" and type(ck.kernel).__name__ == "Function"


@needs_nvcc
@pytest.mark.compile
def test_interrupted_concurrent_and_corrupt_builds_are_detected(tmp_path):
    """A kernel whose meta.json is cut short or missing (a build killed mid-way) is not loaded and is
    rebuilt; two builds into one folder at once both finish, one waiting for the other; a truncated
    artifact in the disk cache is recompiled, never loaded."""
    cfg = tmp_path / "win.yaml"
    cfg.write_text(WINDOW_ONLY.to_yaml())
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "nsa_codegen", "build", "--arch", "sm90", "--config", str(cfg), "--out", str(out),
           "--forward-only", "-j", "1"]
    root = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
             for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    summary = " ".join(o[0] for o in outs)
    assert "2 built, 0 up-to-date" in summary and "0 built, 2 up-to-date" in summary, summary
    keys = [k for k, _ in plan_keys({"win": WINDOW_ONLY}, "sm90", backward=False, decode=False)]
    assert all(artifact_ok(out / "sm90", k) for k in keys)

    meta = out / "sm90" / keys[0].dirname / "meta.json"
    meta.write_text(meta.read_text()[:40])            # cut short
    (out / "sm90" / keys[1].dirname / "meta.json").unlink()   # killed before writing it
    assert not any(artifact_ok(out / "sm90", k) for k in keys)
    r = build({"win": WINDOW_ONLY}, "sm90", out, jobs=1, backward=False, decode=False)
    assert [x.status for x in r] == ["built", "built"] and all(artifact_ok(out / "sm90", k) for k in keys)

    # the disk cache (no generated/): compile once, truncate the artifact, load again in a fresh process
    env = dict(os.environ, NSA_CODEGEN_CACHE_DIR=str(tmp_path / "cache"), NSA_CODEGEN_GENERATED_DIR=str(tmp_path / "none"))
    code = ("from nsa_codegen.cache import get_kernel; from nsa_codegen.lowering import lower_to_plan;"
            "from tests.test_build import WINDOW_ONLY; import glob, os;"
            "ck = get_kernel(lower_to_plan(WINDOW_ONLY).calls[0].key);"
            "print(ck.prebuilt, '__global__' in ck.source())")
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=root)
        assert r.returncode == 0, r.stderr[-1000:]
        assert r.stdout.split()[-2:] == ["None", "True"], r.stdout
        libs = [p for p in (tmp_path / "cache").rglob("*.so")]
        assert libs
        for lib in libs:
            lib.write_bytes(lib.read_bytes()[:100])


def test_build_cli_errors(tmp_path, capsys, monkeypatch):
    assert main(["build", "--arch", "sm75"]) == 2
    assert "supported: sm80, sm90" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("heads: 64\nkv_heads: 3\n")
    assert main(["build", "--arch", "sm90", "--config", str(bad)]) == 2
    assert "kv_heads" in capsys.readouterr().err
    for variant, why in (("selection:{}", "KIND:JSON"), ("selection_fwd:{tile", "not JSON"),
                         ("selection_fwd:[1]", "JSON object")):
        assert main(["build", "--arch", "sm90", "--variant", variant]) == 2
        assert why in capsys.readouterr().err
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    good = tmp_path / "good.yaml"
    good.write_text(WINDOW_ONLY.to_yaml())
    assert main(["build", "--arch", "sm90", "--config", str(good), "--out", str(tmp_path)]) == 2
    assert "nvcc not found" in capsys.readouterr().err


def test_list_show_and_cache_clear(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NSA_CODEGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NSA_CODEGEN_GENERATED_DIR", str(tmp_path / "gen"))
    assert main(["list"]) == 0
    assert main(["show", "sm90/window_fwd/fp16/dk64_dv64/h2_g4/w128/s-000000"]) == 1
    assert "no built or cached kernel" in capsys.readouterr().err
    (tmp_path / "cache").mkdir()
    assert main(["cache", "clear"]) == 0 and not (tmp_path / "cache").exists()
