"""The tuner's search and its log (CPU); the GPU path runs in `nsa-codegen tune`."""
import json

from nsa_codegen import NSASpec
from nsa_codegen.kernel_key import schedule_hash
from nsa_codegen.lowering import lower_to_plan
from nsa_codegen.schedules import default_schedule, load_arch
from nsa_codegen import tuning
from nsa_codegen.codegen import template_source_hash

PLAN = lower_to_plan(NSASpec(), "sm90")
KEY = PLAN.calls[0].key  # compression_fwd


def test_round1_is_the_default_and_its_single_knob_changes():
    cands = tuning.greedy_round1(KEY)
    default = default_schedule(KEY)
    assert cands[0] == default
    space = load_arch("sm90")["kernels"][KEY.kind]["space"]
    assert len(cands) == 1 + sum(len([v for v in vs if v != default[k]]) for k, vs in space.items())
    for c in cands[1:]:
        assert sum(c[k] != default[k] for k in default) == 1


def test_round2_combines_each_knobs_best():
    default = default_schedule(KEY)
    times = {schedule_hash(s): 1.0 for s in tuning.greedy_round1(KEY)}
    assert tuning.greedy_round2(KEY, times) is None  # nothing beats the default
    a = {**default, "block_M": 64}
    b = {**default, "threads": 128}
    times[schedule_hash(a)] = times[schedule_hash(b)] = 0.5
    assert tuning.greedy_round2(KEY, times) == {**default, "block_M": 64, "threads": 128}


def test_every_kind_has_a_way_to_run():
    """Each backward / decode kind of the paper plan is driven through an op; forward kinds directly."""
    for call in PLAN.all_calls:
        if tuning._direct(call.kind):
            continue
        assert call.kind.startswith("decode_") or "_bwd" in call.kind, call.kind
        if call.kind.startswith("decode_"):
            spec = tuning._spec_of(call.key)
            assert spec.window.size == 512 and spec.selection.top_n == 16 and spec.head_dim == 192


def test_speedups_read_the_log(tmp_path):
    default = default_schedule(KEY)
    fast = {**default, "block_M": 64}
    path = tmp_path / "gpu.jsonl"
    t = template_source_hash(KEY.kind)
    recs = [dict(problem=KEY.problem_id, schedule=default, correct=True, median_ms=2.0, template=t),
            dict(problem=KEY.problem_id, schedule=fast, correct=True, median_ms=1.0, template=t),
            dict(problem=KEY.problem_id, schedule={**default, "threads": 128}, correct=False, why="NaN", template=t),
            # an older template text's record is not counted
            dict(problem=KEY.problem_id, schedule={**default, "threads": 384}, correct=True, median_ms=0.1,
                 template="0123456789ab"),
            # nor one of a schedule no longer in the search space (the build would not pick it)
            dict(problem=KEY.problem_id, schedule={**default, "block_M": 48}, correct=True, median_ms=0.1,
                 template=t)]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"cut short")  # an interrupted write
    (row,) = tuning.speedups("sm90", path)
    assert row["speedup"] == 2.0 and row["best_schedule"] == fast and row["candidates"] == 4 and row["correct"] == 2
