"""scripts/count_kernels.py: which HLO instructions count as kernels (a hand-written module)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Entry: 2 fusions, a convolution, a while whose body has a fusion and a reduce (its
# reduction computation is applied, not launched) and bookkeeping; the fused computation's
# own adds run inside its kernel.
MODULE = """HloModule jit_step, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation (p0: f32[4], p1: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %p1 = f32[4]{0} parameter(1)
  %add.1 = f32[4]{0} add(f32[4]{0} %p0, f32[4]{0} %p1)
  ROOT %add.2 = f32[4]{0} add(f32[4]{0} %add.1, f32[4]{0} %p1)
}

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.3 = f32[] add(f32[] %a, f32[] %b)
}

%body (state: (s32[], f32[4])) -> (s32[], f32[4]) {
  %state = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[4]{0}) %state), index=0
  %x = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %state), index=1
  %f = f32[4]{0} fusion(f32[4]{0} %x, f32[4]{0} %x), kind=kLoop, calls=%fused_computation
  %zero = f32[] constant(0)
  %r = f32[] reduce(f32[4]{0} %f, f32[] %zero), dimensions={0}, to_apply=%sum
  ROOT %t = (s32[], f32[4]{0}) tuple(s32[] %i, f32[4]{0} %f)
}

%cond (state.1: (s32[], f32[4])) -> pred[] {
  %state.1 = (s32[], f32[4]{0}) parameter(0)
  ROOT %c = pred[] constant(false)
}

ENTRY %main (x.1: f32[4]) -> f32[4] {
  %x.1 = f32[4]{0} parameter(0)
  %f.1 = f32[4]{0} fusion(f32[4]{0} %x.1, f32[4]{0} %x.1), kind=kLoop, calls=%fused_computation
  %f.2 = f32[4]{0} fusion(f32[4]{0} %f.1, f32[4]{0} %x.1), kind=kLoop, calls=%fused_computation
  %k = f32[1,4,1]{2,1,0} bitcast(f32[4]{0} %f.2)
  %conv = f32[1,4,1]{2,1,0} convolution(f32[1,4,1]{2,1,0} %k, f32[1,1,1]{2,1,0} %k), window={size=1}
  %zero.1 = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(s32[] %zero.1, f32[4]{0} %f.2)
  %loop = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %init), condition=%cond, body=%body
  ROOT %out = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %loop), index=1
}
"""


@pytest.fixture(scope="module")
def ck():
    # The script sets XLA_FLAGS (an HLO dump) on import: keep it out of the processes that
    # later tests start.
    before = os.environ.get("XLA_FLAGS")
    path = REPO / "scripts" / "count_kernels.py"
    spec = importlib.util.spec_from_file_location("count_kernels", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        if before is None:
            os.environ.pop("XLA_FLAGS", None)
        else:
            os.environ["XLA_FLAGS"] = before
    return module


def test_kernels_are_the_entry_and_loop_instructions_outside_fused_computations(ck):
    counts = ck.count_kernels(MODULE)
    assert dict(counts) == {"fusion": 3, "convolution": 1, "reduce": 1}


def test_a_module_without_entry_is_refused(ck):
    with pytest.raises(ValueError, match="no ENTRY"):
        ck.count_kernels(MODULE.replace("ENTRY ", ""))
