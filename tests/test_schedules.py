import json

import pytest

from nsa_codegen import NSASpec
from nsa_codegen import schedules
from nsa_codegen.codegen import check_schedule, template_source_hash
from nsa_codegen.kinds import KINDS
from nsa_codegen.lowering import lower_to_plan

PLAN = lower_to_plan(NSASpec(), "sm90")
# These tests are about schedules/<arch>.yaml and the record format, not the committed H100 records.
pytestmark = pytest.mark.usefixtures("no_tuning_logs")


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
def test_every_kind_has_a_default_and_a_space(arch):
    data = schedules.load_arch(arch)
    # decode_topn: its one knob (the top-n chunk) also sizes decode_sparse's merge; decode_combine:
    # timed alone it misranks its schedules (its inputs come from L2 inside a decode step)
    fixed = {"decode_topn", "decode_combine"}
    for kind in KINDS:
        entry = data["kernels"][kind]
        assert entry["default"] or kind in fixed
        assert entry.get("space") or kind in fixed
        # every knob the space varies has a default (search_space ranks candidates by knobs changed)
        missing = set(entry.get("space") or {}) - set(entry["default"] or {})
        assert not missing, f"{arch} {kind}: space knobs without a default: {sorted(missing)}"


@pytest.mark.parametrize("call", PLAN.all_calls, ids=lambda c: c.kind)
def test_default_schedule_is_feasible_for_paper_config(call):
    sched, source = schedules.resolve_schedule(call.key, lambda s: check_schedule(call.key, s))
    assert source == "default"
    assert sched == schedules.default_schedule(call.key)


def test_search_space_starts_with_default_and_has_no_duplicates():
    key = PLAN.calls[0].key
    space = list(schedules.search_space(key))
    assert space[0] == schedules.default_schedule(key)
    assert len({json.dumps(s, sort_keys=True) for s in space}) == len(space) > 10


def test_tuned_record_wins_and_broken_lines_are_skipped(tmp_path, monkeypatch):
    key = PLAN.calls[2].key
    d = tmp_path / "sm90"
    d.mkdir()
    good = {**schedules.default_schedule(key), "num_stages": 3}
    other = {**schedules.default_schedule(key), "num_stages": 2}
    current = template_source_hash(key.kind)
    lines = [json.dumps({"problem": key.problem_id, "schedule": good, "correct": True, "median_ms": 1.0,
                         "template": current}),
             json.dumps({"problem": key.problem_id, "schedule": schedules.default_schedule(key), "correct": True,
                         "median_ms": 2.0, "template": current}),
             # faster, but measured an older text of the template: no longer counts
             json.dumps({"problem": key.problem_id, "schedule": other, "correct": True, "median_ms": 0.5,
                         "template": "0123456789ab"}),
             json.dumps({"problem": key.problem_id, "schedule": {"threads": 64, "num_stages": 1},
                         "correct": False, "median_ms": 0.1}),
             json.dumps({"problem": "other", "schedule": {}, "correct": True, "median_ms": 0.01}),
             '{"problem": "cut sho']
    (d / "NVIDIA_H100.jsonl").write_text("\n".join(lines))
    monkeypatch.setenv("NSA_CODEGEN_TUNING_DIR", str(tmp_path))
    sched, source = schedules.resolve_schedule(key, lambda s: check_schedule(key, s))
    assert (sched, source) == (good, "tuned")


def _tuning_log(tmp_path, monkeypatch, key):
    """(write(records), default, other): a tune folder the schedules read for key's problem, where
    write takes (schedule, median_ms[, correct]) records of the current template; other is the
    default with num_stages 3."""
    d = tmp_path / "sm90"
    d.mkdir()
    monkeypatch.setenv("NSA_CODEGEN_TUNING_DIR", str(tmp_path))
    current = template_source_hash(key.kind)

    def write(*records):
        (d / "NVIDIA_H100.jsonl").write_text("\n".join(
            json.dumps({"problem": key.problem_id, "schedule": r[0], "correct": r[2] if len(r) > 2 else True,
                        "median_ms": r[1], "template": current}) for r in records))
    default = schedules.default_schedule(key)
    return write, default, {**default, "num_stages": 3}


@pytest.mark.parametrize("tuned_ms,expect", [(0.98, "default"), (0.96, "tuned")])
def test_tuned_schedule_must_beat_the_default_by_min_gain(tmp_path, monkeypatch, tuned_ms, expect):
    key = PLAN.calls[2].key
    write, default, other = _tuning_log(tmp_path, monkeypatch, key)
    assert other != default and schedules.MIN_GAIN == 0.03
    write((default, 1.0), (other, tuned_ms))
    sched, source = schedules.resolve_schedule(key, lambda s: check_schedule(key, s))
    # 2% faster is within timing noise: the default stays; 4% faster replaces it
    assert (sched, source) == ((default, "default") if expect == "default" else (other, "tuned"))


def test_no_tuned_schedule_without_a_measured_default(tmp_path, monkeypatch):
    """A record faster than nothing measured proves nothing: with no record of the default's own
    time the default stays; a default measured and found wrong does not block a correct record."""
    key = PLAN.calls[2].key
    write, default, other = _tuning_log(tmp_path, monkeypatch, key)
    feasible = lambda s: check_schedule(key, s)  # noqa: E731
    write((other, 0.5))
    assert schedules.resolve_schedule(key, feasible) == (default, "default")
    write((other, 0.5), (default, None, False))
    assert schedules.resolve_schedule(key, feasible) == (other, "tuned")


def test_records_outside_the_search_space_do_not_count(tmp_path, monkeypatch):
    key = PLAN.calls[2].key
    write, default, other = _tuning_log(tmp_path, monkeypatch, key)
    write((default, 1.0), (other, 0.5))
    feasible = lambda s: check_schedule(key, s)  # noqa: E731
    assert schedules.resolve_schedule(key, feasible) == (other, "tuned")
    # the space narrowed (num_stages no longer searched) after `other` was measured: its record
    # no longer counts
    data = schedules.load_arch(key.arch)
    entry = data["kernels"][key.kind]
    narrowed = {**data, "kernels": {**data["kernels"], key.kind: {
        **entry, "space": {k: v for k, v in entry["space"].items() if k != "num_stages"}}}}
    monkeypatch.setattr(schedules, "load_arch", lambda arch: narrowed)
    assert not schedules.in_search_space(key.arch, key.kind, other)
    assert schedules.in_search_space(key.arch, key.kind, default)
    assert schedules.resolve_schedule(key, feasible) == (default, "default")


def test_single_knob_changes_of_the_default_are_in_the_space():
    # the tuner's round 1 keeps the default's value of every other knob, even where that value
    # (window_fwd's block_N 0 = auto) is not one the space lists
    key = next(c.key for c in PLAN.calls if c.kind == "window_fwd")
    default = schedules.default_schedule(key)
    assert default["block_N"] == 0
    assert schedules.in_search_space(key.arch, key.kind, {**default, "num_stages": 3})
    assert not schedules.in_search_space(key.arch, key.kind, {**default, "num_stages": 5})
    assert not schedules.in_search_space(key.arch, key.kind, {**default, "warp_size": 7})


def test_infeasible_default_falls_back_with_reason():
    key = PLAN.calls[3].key
    default = schedules.default_schedule(key)
    sched, source = schedules.resolve_schedule(key, lambda s: "nope" if s == default else None)
    assert source == "fallback" and sched != default
    with pytest.raises(ValueError, match="no schedule .* fits"):
        schedules.resolve_schedule(key, lambda s: "never")
