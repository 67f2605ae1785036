"""common.nonfinite in one process; the 2-rank runs that skip a NaN step are in test_pretrain_train and
test_finetune."""
from __future__ import annotations

import math

import pytest
import torch

from common.nonfinite import NonFiniteError, NonFiniteGuard, backward_loss, check_finite_weights, \
    require_skipping_engine


def test_a_non_finite_loss_gives_nan_gradients_even_where_they_would_be_finite():
    weight = torch.ones(3, requires_grad=True)
    (weight.sum() + math.inf).backward()  # an inf loss whose plain gradient is finite: the engine would apply it
    assert torch.equal(weight.grad, torch.ones(3))
    weight.grad = None
    backward_loss(weight.sum() + math.inf).backward()
    assert torch.isnan(weight.grad).all()
    weight.grad = None
    loss = backward_loss(weight.sum() * 2)
    loss.backward()
    assert loss.item() == 6.0 and torch.equal(weight.grad, torch.full((3,), 2.0))  # a finite loss is untouched


class _Engine:
    """What the guard reads from a DeepSpeed engine after a step."""

    def __init__(self, applied: bool, norm: float | None):
        self.applied, self.norm = applied, norm

    def was_step_applied(self) -> bool:
        return self.applied

    def get_global_grad_norm(self) -> float | None:
        return self.norm


def test_guard_counts_skips_stops_after_n_in_a_row_and_refuses_an_applied_non_finite_step():
    guard = NonFiniteGuard(max_consecutive=2)
    steps = [(True, 1.0, True), (False, math.inf, False), (True, 0.5, True), (False, math.inf, True),
             (False, math.nan, False)]
    for step, (applied, norm, finite) in enumerate(steps[:4], start=1):
        assert guard.after_step(_Engine(applied, norm), step, finite) is not applied
        guard.stop_if_exhausted(step)
    assert (guard.skipped, guard.consecutive) == (2, 1)
    restored = NonFiniteGuard(max_consecutive=2)
    restored.load_state_dict(guard.state_dict())  # as a resume does
    assert restored.after_step(_Engine(False, math.nan), 5, False)
    with pytest.raises(NonFiniteError, match="stopping at step 5: 2 optimizer steps in a row"):
        restored.stop_if_exhausted(5)
    with pytest.raises(NonFiniteError, match="step 6: the optimizer applied a step with a non-finite loss"):
        guard.after_step(_Engine(True, 1.0), 6, False)
    with pytest.raises(NonFiniteError, match="non-finite gradient norm"):
        guard.after_step(_Engine(True, math.inf), 6, True)


def test_weights_with_nan_are_never_saved_and_an_engine_that_cannot_skip_is_refused():
    module = torch.nn.Linear(2, 2)
    check_finite_weights(module, "checkpoint x", torch.device("cpu"))
    with torch.no_grad():
        module.bias[1] = math.inf
    with pytest.raises(NonFiniteError, match="not writing checkpoint x: bias's weights hold NaN/inf"):
        check_finite_weights(module, "checkpoint x", torch.device("cpu"))

    class Plain:  # ZeRO stage 0 in fp32: DeepSpeed steps the torch optimizer itself
        optimizer = torch.optim.AdamW(module.parameters())

    with pytest.raises(ValueError, match="ds.json: .*would apply a step with NaN/inf gradients"):
        require_skipping_engine(Plain(), "ds.json")
