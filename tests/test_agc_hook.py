"""`agc_hook`: AGC inside a torch optimizer's step, in a plain PyTorch loop. Each test checks the update SGD (lr 1, no
momentum) applies against the float64 reference rule on a replayed gradient (`step_reference`): with GradScaler
(the hook must clip the unscaled gradient, and not at all on a step the scaler skips), with gradient accumulation
(once per step, the summed gradient), with exclusions and per-group lambdas, and after `remove()`."""
import pytest
import torch

import normfree
from agc_reference import units_of
from normfree.agc.hook import OptimizerAGC, unscale_for_step
from step_reference import (
    CLIPPING,
    assert_update,
    batches,
    expected_update,
    loss_of,
    replayed_grads,
    snapshot,
    tiny_model,
)

CLASSIFIER = {"2.weight"}  # what AGC leaves alone by default (DeepMind's rule)


def sgd(model, fused=False):
    return torch.optim.SGD(model.parameters(), lr=1.0, fused=fused)


def check_steps(model, optimizer, hook, steps=2, micro=1, unclipped=CLASSIFIER, clipping=CLIPPING, scaler=None,
                unscale_first=False):
    """Train `steps` steps of `micro` accumulated micro-batches; each update must be the reference AGC update."""
    clipped_total = 0
    for step in range(steps):
        micro_batches = batches(micro, seed=10 + step)
        before, grads = snapshot(model), replayed_grads(model, micro_batches)
        update, clipped = expected_update(before, grads, unclipped, clipping)
        units = sum(len(units_of(w)) for name, w in before.items() if name not in unclipped)
        assert 0 < clipped and (clipped < units or units == 1)  # some units clip, others not
        for x, y in micro_batches:
            loss = loss_of(model, x, y) / micro
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            if unscale_first:
                scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad()
        assert_update(before, snapshot(model), update)
        clipped_total += clipped
    assert len(hook.history) == steps  # once per optimizer step
    assert int(hook.history.clipped().sum()) == clipped_total


def test_update_is_the_reference_agc_update():
    model = tiny_model()
    optimizer = sgd(model)
    hook = normfree.agc_hook(optimizer, model, clipping=CLIPPING)
    check_steps(model, optimizer, hook, steps=3)
    assert hook.history.parameter_names == ["0.weight", "0.bias", "2.bias"]


def test_accumulated_gradient_is_clipped_once_per_step():
    """Three micro-batches per step: the sum is clipped at the step, not each micro-batch's share."""
    model = tiny_model()
    optimizer = sgd(model)
    hook = normfree.agc_hook(optimizer, model, clipping=CLIPPING)
    check_steps(model, optimizer, hook, steps=2, micro=3)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaler.step", "unscale_+step"])
def test_grad_scaler_clips_the_unscaled_gradient(fused, unscale_first):
    """Loss scale 2**12 (exact in float32): clipping the scaled gradient would shrink the update 4096-fold. A fused
    optimizer gets GradScaler's gradients still scaled unless unscale_ was called."""
    model = tiny_model()
    optimizer = sgd(model, fused=fused)
    hook = normfree.agc_hook(optimizer, model, clipping=CLIPPING)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    check_steps(model, optimizer, hook, steps=2, micro=2, scaler=scaler, unscale_first=unscale_first)


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_step_the_scaler_skips_is_neither_clipped_nor_counted(fused):
    model = tiny_model()
    optimizer = sgd(model, fused=fused)
    hook = normfree.agc_hook(optimizer, model, clipping=CLIPPING)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batches(1)[0]
    x[0, 0] = float("inf")
    before = snapshot(model)
    scaler.scale(loss_of(model, x, y)).backward()
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0**11  # skipped
    assert len(hook.history) == 0
    for name, p in snapshot(model).items():
        assert torch.equal(p, before[name])


def test_fp16_autocast_on_the_cpu_clips_what_the_step_applies():
    """Real float16 autocast with GradScaler("cpu"): the update is AGC of the unscaled gradient the optimizer gets
    (seen by a step pre-hook registered before AGC's, inside scaler.step)."""
    model = tiny_model()
    optimizer = sgd(model)
    seen = {}
    optimizer.register_step_pre_hook(lambda *_: seen.update(before=snapshot(model), grads={
        n: p.grad.clone() for n, p in model.named_parameters()}))
    hook = normfree.agc_hook(optimizer, model, clipping=CLIPPING)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = batches(1, size=8)[0]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = loss_of(model, x, y)
    scaler.scale(loss).backward()
    scaled = {n: p.grad.clone() for n, p in model.named_parameters()}
    scaler.step(optimizer)
    update, clipped = expected_update(seen["before"], seen["grads"], CLASSIFIER)
    assert clipped > 0 and len(hook.history) == 1
    torch.testing.assert_close(seen["grads"]["0.weight"] * 2**12, scaled["0.weight"])  # it saw unscaled gradients
    assert_update(seen["before"], snapshot(model), update)


def test_exclusions_are_the_fastai_callbacks():
    """exclude="0" (the hidden Linear, by module name) and the classifier weight keep their raw gradient;
    skip_classifier=None clips the classifier weight too."""
    model = tiny_model()
    optimizer = sgd(model)
    hook = normfree.agc_hook(optimizer, model, clipping=CLIPPING, exclude="0")
    micro_batches = batches(1, seed=10)
    before, grads = snapshot(model), replayed_grads(model, micro_batches)
    clipped_anyway, _ = expected_update(before, grads, set())
    assert not torch.allclose(clipped_anyway["0.weight"], -grads["0.weight"].double())  # would have clipped
    check_steps(model, optimizer, hook, steps=1, unclipped={"0.weight", "0.bias", "2.weight"})
    hook.remove()

    model = tiny_model()
    optimizer = sgd(model)
    hook = normfree.agc_hook(optimizer, model, clipping=CLIPPING, skip_classifier=None)
    check_steps(model, optimizer, hook, steps=1, unclipped=set())
    assert "2.weight" in hook.history.parameter_names


def test_one_lambda_per_param_group():
    model = tiny_model()
    optimizer = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=1.0)
    hook = normfree.agc_hook(optimizer, model, clipping=[0.3, 0.02])
    lambdas = {"0.weight": 0.3, "0.bias": 0.3, "2.weight": 0.02, "2.bias": 0.02}
    check_steps(model, optimizer, hook, steps=1, clipping=lambdas)
    assert hook.history.names == [["0.weight", "0.bias"], ["2.bias"]]


def test_removed_hook_clips_no_more():
    model = tiny_model()
    optimizer = sgd(model)
    hook = normfree.agc_hook(optimizer, model, clipping=CLIPPING)
    check_steps(model, optimizer, hook, steps=1)
    hook.remove()
    micro_batches = batches(1, seed=20)
    before, grads = snapshot(model), replayed_grads(model, micro_batches)
    loss_of(model, *micro_batches[0]).backward()
    optimizer.step()
    assert_update(before, snapshot(model), {n: -g.double() for n, g in grads.items()})
    assert len(hook.history) == 1


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_unscale_for_step_unscales_once_and_reports_skips(fused):
    """The trainers' path (clipping in a hook before scaler.step): unscale unless done, then clip; a fused optimizer
    is left scaled by trainers (Lightning) and unscaled here; an inf gradient says the step will be skipped."""
    model = tiny_model()
    optimizer = sgd(model, fused=fused)
    agc = OptimizerAGC(optimizer, model, clipping=CLIPPING)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    micro_batches = batches(1, seed=10)
    before, grads = snapshot(model), replayed_grads(model, micro_batches)
    update, _ = expected_update(before, grads, CLASSIFIER)
    scaler.scale(loss_of(model, *micro_batches[0])).backward()
    assert unscale_for_step(scaler, optimizer) and unscale_for_step(scaler, optimizer)  # the second: nothing to do
    agc.clip()
    scaler.step(optimizer)
    scaler.update()
    assert_update(before, snapshot(model), update)

    optimizer.zero_grad()
    x, y = batches(1)[0]
    x[0, 0] = float("nan")
    scaler.scale(loss_of(model, x, y)).backward()
    assert not unscale_for_step(scaler, optimizer)
    assert unscale_for_step(None, optimizer)


@pytest.mark.bad_input
def test_without_the_model_the_classifier_cannot_be_found():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"needs model=.*skip_classifier=None"):
        normfree.agc_hook(sgd(model))
    hook = normfree.agc_hook(sgd(model), skip_classifier=None)  # clips everything, named by position
    assert hook.history.parameter_names == ["group0.param0", "group0.param1", "group0.param2", "group0.param3"]


@pytest.mark.bad_input
def test_one_lambda_per_group_must_match_the_groups():
    model = tiny_model()
    with pytest.raises(ValueError, match="clipping has 2 values but the optimizer has 1 param groups"):
        normfree.agc_hook(sgd(model), model, clipping=[0.1, 0.2])


@pytest.mark.bad_input
@pytest.mark.parametrize("clipping", [0.0, -1.0, float("nan")])
def test_clipping_must_be_positive(clipping):
    model = tiny_model()
    with pytest.raises(ValueError, match="clipping"):
        normfree.agc_hook(sgd(model), model, clipping=clipping)


@pytest.mark.bad_input
def test_a_model_is_not_an_optimizer():
    model = tiny_model()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer.*got Sequential"):
        normfree.agc_hook(model, model)


@pytest.mark.bad_input
def test_an_exclusion_that_matches_nothing_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="exclude pattern 'head' matches no parameter"):
        normfree.agc_hook(sgd(model), model, exclude="head")


@pytest.mark.bad_input
def test_a_model_without_a_classifier_is_named():
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.Tanh(), torch.nn.Conv1d(4, 1, 1))
    with pytest.warns(UserWarning, match="no final classifier.*clips every parameter"):
        hook = normfree.agc_hook(sgd(model), model)
    assert len(hook.history.parameter_names) == 4
