import subprocess
import sys

from nsa_codegen.cli import main


def test_help_lists_commands(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for cmd in ("doctor", "spec", "build", "tune"):
        assert cmd in out


def test_doctor_reports_toolchain(capsys):
    main(["doctor"])
    out = capsys.readouterr().out
    for item in ("torch", "tilelang", "nvcc", "gpu"):
        assert item in out


def test_spec_validate(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("heads: 64\nkv_heads: 4\nhead_dim: 128\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("heads: 64\nkv_heads: 4\nhead_dim: 0\n")
    beyond = tmp_path / "beyond.yaml"   # valid NSA (head dim 100) the kernels do not cover
    beyond.write_text("heads: 64\nkv_heads: 4\nhead_dim: 100\n")
    assert main(["spec", "validate", str(good)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["spec", "validate", str(good), str(bad)]) == 1
    err = capsys.readouterr().err
    assert "head_dim" in err and ">= 1" in err
    assert main(["spec", "validate", str(tmp_path / "missing.yaml")]) == 1
    capsys.readouterr()
    assert main(["spec", "validate", str(beyond)]) == 0            # valid
    assert main(["spec", "validate", "--arch", "sm90", str(good)]) == 0
    assert "sm90 kernels: cover it" in capsys.readouterr().out
    assert main(["spec", "validate", "--arch", "sm90", str(beyond)]) == 1
    out = capsys.readouterr().out
    assert "sm90 kernels: head_dim: 100 is not supported" in out and "reference" in out


def test_cli_names_what_is_wrong(tmp_path, capsys):
    """Hostile command lines: a missing spec file, an unsafe YAML tag, an unknown kernel key."""
    assert main(["build", "--arch", "sm90", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert f"no such file: {tmp_path / 'missing.yaml'}" in capsys.readouterr().err
    evil = tmp_path / "evil.yaml"
    evil.write_text("heads: !!python/object/apply:os.system ['echo pwned']\n")
    assert main(["spec", "validate", str(evil)]) == 1
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "pwned" not in capsys.readouterr().out
    assert main(["show", "sm90/nonsense"]) == 1
    assert "no built or cached kernel with key sm90/nonsense" in capsys.readouterr().err


def test_console_entry_point_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "nsa_codegen", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "nsa-codegen" in r.stdout


def test_tune_without_gpu_says_so(capsys):
    import torch
    if torch.cuda.is_available():
        return
    assert main(["tune", "--arch", "sm90"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_show_takes_a_key_or_its_problem_id(tmp_path, monkeypatch, capsys):
    import json
    key = "sm90/window_fwd/fp16/dk64_dv64/h2_g4/w128/s-abc123"
    d = tmp_path / "sm90" / key.replace("/", "__")
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"key": key, "schedule": {"threads": 128}}))
    monkeypatch.setenv("NSA_CODEGEN_GENERATED_DIR", str(tmp_path))
    for name in (key, key.rsplit("/s-", 1)[0]):
        assert main(["show", name]) == 0
        assert key in capsys.readouterr().out
    assert main(["show", "sm90/window_fwd/fp16/dk64_dv64/h2_g4/w256"]) == 1
    assert "no built or cached kernel" in capsys.readouterr().err


def test_hostile_command_lines_get_named_errors(tmp_path, capsys, monkeypatch):
    """Bad numbers, folders for files, clashing spec names, a file as --out, an unknown --kind and
    --arch: each is refused with a message naming it (exit 2 / 1), never a traceback."""
    import pytest
    for argv, what in ((["build", "--arch", "sm90", "-j", "0"], "-j/--jobs: must be > 0"),
                       (["tune", "--arch", "sm90", "--budget-minutes", "-5"], "--budget-minutes: must be > 0"),
                       (["tune", "--arch", "sm90", "--seq-len", "abc"], "--seq-len: expected a int"),
                       (["tune", "--arch", "sm90", "--max-candidates", "0"], "--max-candidates: must be > 0")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and what in capsys.readouterr().err, argv
    assert main(["spec", "validate", str(tmp_path)]) == 1
    assert "a folder, not a spec file" in capsys.readouterr().err
    assert main(["spec", "validate", "--arch", "sm75", str(tmp_path)]) == 2
    assert "unknown arch 'sm75'" in capsys.readouterr().err
    binary = tmp_path / "blob.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert main(["spec", "validate", str(binary)]) == 1
    assert "invalid" in capsys.readouterr().err
    spec = "heads: 8\nkv_heads: 2\nhead_dim: 64\nv_head_dim: 64\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in ("a", "b"):
        (tmp_path / d / "same.yaml").write_text(spec)
    assert main(["build", "--arch", "sm90", "--config", str(tmp_path / "a" / "same.yaml"),
                 str(tmp_path / "b" / "same.yaml")]) == 2
    assert "two spec files are both named 'same'" in capsys.readouterr().err
    assert main(["build", "--arch", "sm90", "--config", str(tmp_path / "a")]) == 2
    assert "a folder, not a spec file" in capsys.readouterr().err
    assert main(["build", "--arch", "sm90", "--config", str(tmp_path / "a" / "same.yaml"), "--out", str(binary)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["tune", "--arch", "sm90", "--kind", "selection_bwd"]) in (2,)
    err = capsys.readouterr().err
    assert "unknown kind(s) ['selection_bwd']" in err or "no CUDA GPU" in err


def test_list_and_show_report_corrupt_records(tmp_path, monkeypatch, capsys):
    key = "sm90/window_fwd/fp16/dk64_dv64/h2_g4/w128/s-abc123"
    d = tmp_path / "sm90" / key.replace("/", "__")
    d.mkdir(parents=True)
    (d / "meta.json").write_text('{"key": "sm90/win')   # cut short by a killed build
    monkeypatch.setenv("NSA_CODEGEN_GENERATED_DIR", str(tmp_path))
    monkeypatch.setenv("NSA_CODEGEN_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["list"]) == 0
    assert "corrupt" in capsys.readouterr().out
    assert main(["show", key]) == 1
    assert "is corrupt" in capsys.readouterr().err
