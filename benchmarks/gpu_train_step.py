"""Section 2 of `benchmarks/gpu.py`: the nfnet_f0 training step (bf16 autocast, channels-last, SGD-Nesterov) without
AGC, with normfree's AGC, timm's, and normfree's fastai callback driven by a stand-in learner."""
from __future__ import annotations

import statistics
import traceback
from types import SimpleNamespace

import torch

from gpu_common import (
    CLIPPING,
    EPS,
    S2,
    Context,
    autocast,
    batch,
    clipped_parameters,
    log,
    make_model,
    ms,
    pct,
    short_error,
    sync,
    sync_check,
    times_ms,
)


def stand_in_learner(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> SimpleNamespace:
    """What `normfree.AGC`'s before_train / before_step read from a fastai Learner."""
    param_lists = [list(g["params"]) for g in optimizer.param_groups]
    return SimpleNamespace(model=model, opt=SimpleNamespace(param_lists=param_lists))


def section_train_step(ctx: Context) -> dict:
    from timm.utils.agc import adaptive_clip_grad as timm_agc

    import normfree

    name, s = S2, ctx.sizes
    setting = f"{s.nfnet} bs {s.step_batch} {s.step_size} px bf16 channels-last SGD-Nesterov"
    model = make_model(s.nfnet, ctx, channels_last=True)
    x, y = batch(ctx, s.step_batch, s.step_size, channels_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    params = clipped_parameters(model)
    data: dict = {}
    try:  # the callback's own per-step work (ClipHistory.record, ...) is part of what is timed
        callback = normfree.AGC(CLIPPING, EPS)
        callback.learn = stand_in_learner(model, optimizer)
        callback.before_train()
    except Exception as error:  # noqa: BLE001 - time the others
        callback = None
        data.setdefault("errors", {})["callback"] = traceback.format_exc()
        ctx.results.row(name, setting, "callback: ERROR", short_error(error))
    last_loss = []
    # Whole steps vary by several ms from round to round (clocks, the host), more than AGC's share: the
    # share is also measured inside each step, with events around the clipping call alone.
    clip_events: dict[str, list] = {}

    def step(clip, key):
        def run():
            optimizer.zero_grad(set_to_none=False)
            with autocast(ctx, "bf16"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            if ctx.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                clip()
                end.record()
                clip_events.setdefault(key, []).append((start, end))
            else:
                clip()
            optimizer.step()
            last_loss[:] = [loss.detach()]
        return run

    variants = {
        "none": step(lambda: None, "none"),
        "normfree": step(lambda: normfree.adaptive_clip_grad_(params, CLIPPING, EPS), "normfree"),
        "timm": step(lambda: timm_agc(params, CLIPPING, EPS), "timm"),
    }
    if callback is not None:
        variants["callback"] = step(callback.before_step, "callback")
    for key, run in list(variants.items()):
        log(f"  section 2: warm-up {key}")
        try:
            times_ms(ctx, run, s.step_warmup)
        except Exception as error:  # noqa: BLE001 - time the others
            data.setdefault("errors", {})[key] = traceback.format_exc()
            ctx.results.row(name, setting, f"{key}: ERROR", short_error(error))
            del variants[key]
    samples: dict[str, list[float]] = {key: [] for key in variants}
    order = list(variants)
    for round_ in range(s.step_rounds):
        for key in order[round_ % len(order):] + order[: round_ % len(order)]:
            samples[key] += times_ms(ctx, variants[key], s.step_per_round)
    log("  section 2: timed")
    clip_events = {key: pairs[-len(samples[key]):] for key, pairs in clip_events.items()}  # the timed steps
    sync(ctx)
    in_step = {key: statistics.median(start.elapsed_time(end) for start, end in pairs)
               for key, pairs in clip_events.items()}
    data["in_step_clip_ms"] = in_step
    median = {key: statistics.median(v) for key, v in samples.items()}
    data.update(median_ms=median, samples_ms=samples,
                steps_recorded_by_callback=len(callback.history) if callback else None,
                final_loss=float(last_loss[0]) if last_loss else None)
    labels = {"none": "step without AGC", "normfree": "step + normfree adaptive_clip_grad_",
              "timm": "step + timm adaptive_clip_grad", "callback": "step + normfree.AGC callback (before_step)"}
    for key, label in labels.items():
        if key in median:
            ctx.results.row(name, setting, label + ", median", ms(median[key]))
    if {"none", "normfree"} <= median.keys():
        data["agc_share_whole_steps"] = share = (median["normfree"] - median["none"]) / median["none"]
        ctx.results.row(name, setting, "normfree AGC's share from whole steps: (agc - none) / none", pct(share))
    for key, label in (("normfree", "normfree AGC"), ("timm", "timm AGC"), ("callback", "normfree.AGC callback")):
        if key in in_step and "none" in median:
            share = (in_step[key] - in_step.get("none", 0.0)) / median["none"]
            data[f"in_step_share_{key}"] = share
            target = {"normfree": ("<= 2%", share <= 0.02)}.get(key, ("", None))
            ctx.results.row(name, setting, f"{label}: time inside the step (events around the call), median / step "
                            f"without AGC", f"{ms(in_step[key])} = {pct(share)}", *target)
    if {"normfree", "callback"} <= in_step.keys() and "none" in median:
        data["in_step_callback_extra_share"] = extra = (in_step["callback"] - in_step["normfree"]) / median["none"]
        ctx.results.row(name, setting, "callback's own work inside the step: (callback - normfree) / step without AGC",
                        pct(extra), "<= 0.5%", extra <= 0.005)
    if {"none", "timm"} <= median.keys():
        data["timm_share"] = share = (median["timm"] - median["none"]) / median["none"]
        ctx.results.row(name, setting, "timm AGC's share: (timm - none) / none", pct(share))
    for key in [k for k in ("none", "callback") if k in variants]:
        found = sync_check(ctx, variants[key])
        data[f"host_sync_{key}"] = found
        ctx.results.row(name, setting, f"host synchronisation in one step ({labels[key]})", found, "none",
                        None if found.startswith("n/a") else found == "none")
    return data
