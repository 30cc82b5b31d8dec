"""`normfree.agc_hook` on accelerate's prepared optimizer, in accelerate's own loop (``accelerator.accumulate``,
``accelerator.backward``): the hook sits on the torch optimizer inside, so it runs once per sync step, after
accelerate's GradScaler unscaled the gradients, and not on a step the scaler skips. The CPU gets no GradScaler from
accelerate, so the test gives the accelerator one (loss scale 2**12, exact in float32); the update SGD (lr 1)
applies must be the float64 reference AGC update of the replayed mean gradient of the step's micro-batches."""
import pytest
import torch

accelerate = pytest.importorskip("accelerate")

import normfree  # noqa: E402
from step_reference import (  # noqa: E402
    CLIPPING,
    assert_update,
    batches,
    expected_update,
    loss_of,
    replayed_grads,
    snapshot,
    tiny_model,
)

CLASSIFIER = {"2.weight"}


def accelerator_with_scaler(accumulation, scaled):
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    if scaled:  # before prepare(): the prepared optimizer takes the accelerator's scaler
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    return accelerator


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "fp16-scaler"])
def test_update_is_the_reference_agc_update_once_per_sync_step(scaled):
    accumulation, steps = 3, 2
    accelerator = accelerator_with_scaler(accumulation, scaled)
    model = tiny_model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    hook = normfree.agc_hook(optimizer, model, clipping=CLIPPING)
    clipped_total = 0
    for step in range(steps):
        micro_batches = batches(accumulation, seed=10 + step)
        before, grads = snapshot(model), replayed_grads(model, micro_batches)
        update, clipped = expected_update(before, grads, CLASSIFIER)
        assert clipped > 0
        for x, y in micro_batches:
            with accelerator.accumulate(model):
                accelerator.backward(loss_of(model, x, y))
                optimizer.step()
                optimizer.zero_grad()
        assert_update(before, snapshot(model), update)
        clipped_total += clipped
    assert len(hook.history) == steps  # one clip per sync step, not per micro-batch
    assert int(hook.history.clipped().sum()) == clipped_total
    if scaled:
        assert accelerator.scaler.get_scale() == 2.0**12  # no step skipped


def test_a_step_the_scaler_skips_is_neither_clipped_nor_counted():
    accelerator = accelerator_with_scaler(1, scaled=True)
    model = tiny_model()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    hook = normfree.agc_hook(optimizer, model, clipping=CLIPPING)
    x, y = batches(1)[0]
    x[0, 0] = float("inf")
    before = snapshot(model)
    accelerator.backward(loss_of(model, x, y))
    optimizer.step()
    assert optimizer.step_was_skipped and len(hook.history) == 0
    assert all(torch.equal(w, before[n]) for n, w in snapshot(model).items())
