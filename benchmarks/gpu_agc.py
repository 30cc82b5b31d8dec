"""Section 1 of `benchmarks/gpu.py`: AGC on nfnet_f0's real gradients (fp32), against a copy of all gradients (the
memory floor), timm's `adaptive_clip_grad`, the torch-ops path and a CUDA graph replay; its error against the float64
reference; whether it synchronises with the host."""
from __future__ import annotations

import traceback

import torch

from gpu_common import (
    CLIPPING,
    EPS,
    S1,
    Context,
    agc_reference,
    batch,
    clipped_parameters,
    log,
    make_model,
    max_relative_error,
    median_ms,
    ms,
    short_error,
    sync,
    sync_check,
)


def section_agc(ctx: Context) -> dict:
    from timm.utils.agc import adaptive_clip_grad as timm_agc

    import normfree

    name, s = S1, ctx.sizes
    model = make_model(s.nfnet, ctx)
    x, y = batch(ctx, s.agc_batch, s.agc_size)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    del x, y
    params = [p for p in clipped_parameters(model) if p.grad is not None]
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    copies = [torch.empty_like(g) for g in grads]
    megabytes = sum(g.numel() * g.element_size() for g in grads) / 1e6
    setting = f"{s.nfnet} fp32 grads of bs {s.agc_batch} {s.agc_size} px: {len(params)} tensors, {megabytes:.0f} MB"
    from normfree.agc.clip import clip_with_torch_ops as torch_ops


    def restore():
        torch._foreach_copy_(grads, saved)

    no_grad = torch.no_grad()
    methods = {
        "copy": lambda: torch._foreach_copy_(copies, grads),
        "timm": no_grad(lambda: timm_agc(params, CLIPPING, EPS)),
        "torch_ops": no_grad(lambda: torch_ops(params, CLIPPING, EPS)),
        "normfree": lambda: normfree.adaptive_clip_grad_(params, CLIPPING, EPS),
    }
    data: dict = dict(tensors=len(params), megabytes=megabytes, torch_ops_function="clip_with_torch_ops")
    graph_error = None
    if ctx.cuda:
        try:
            restore()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    methods["normfree"]()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                methods["normfree"]()
            methods["graph"] = graph.replay
        except Exception as error:  # noqa: BLE001
            graph_error = f"{type(error).__name__}: {error}"
            data["graph_error"] = traceback.format_exc()
    timings, failed = {}, {}
    for key, fn in methods.items():
        log(f"  section 1: timing {key}")
        try:
            timings[key] = median_ms(ctx, fn, s.agc_warmup, s.agc_reps, before=restore)
        except Exception as error:  # noqa: BLE001 - the other methods still run
            failed[key] = short_error(error)
            data.setdefault("errors", {})[key] = traceback.format_exc()
    data["median_ms"] = timings
    if "copy" in timings:
        data["copy_gb_per_s_read_plus_write"] = 2 * megabytes / 1e3 / (timings["copy"] / 1e3)

    labels = {"copy": "(a) one copy of all gradients (memory floor)", "timm": "(b) timm adaptive_clip_grad",
              "torch_ops": "(c) normfree clip_with_torch_ops", "normfree": "(d) normfree adaptive_clip_grad_",
              "graph": "(e) (d) captured in a CUDA graph, replayed"}
    for key, label in labels.items():
        if key in timings:
            ctx.results.row(name, setting, label + ", median", ms(timings[key]))
        else:
            ctx.results.row(name, setting, label, failed.get(key) or graph_error or "n/a (CPU)")
    if {"normfree", "copy"} <= timings.keys():
        data["d_over_a"] = d_over_a = timings["normfree"] / timings["copy"]
        ctx.results.row(name, setting, "(d) / (a)", f"{d_over_a:.2f}x", "<= 3", d_over_a <= 3)
    if {"normfree", "timm"} <= timings.keys():
        data["b_over_d"] = b_over_d = timings["timm"] / timings["normfree"]
        ctx.results.row(name, setting, "(b) / (d)", f"{b_over_d:.1f}x", ">= 40", b_over_d >= 40)
    replayed = _plan_graph_state(params)
    data["plan_graph"] = replayed
    ctx.results.row(name, setting, "(d)'s launches replayed from the plan's own CUDA graph", replayed)
    if {"graph", "copy"} <= timings.keys():
        ctx.results.row(name, setting, "(e) / (a)", f"{timings['graph'] / timings['copy']:.2f}x")

    reference, clipped, units = agc_reference(params, saved)
    data["units_clipped"], data["units"] = clipped, units
    for key, label in (("normfree", "(d)"), ("torch_ops", "(c)"), ("graph", "(e)")):
        if key not in timings:
            continue
        restore()
        methods[key]()
        sync(ctx)
        error = max_relative_error(grads, reference)
        data[f"max_rel_error_{key}"] = error
        ctx.results.row(name, setting, f"{label} max rel. error vs float64 reference ({clipped}/{units} units clip)",
                        f"{error:.1e}", "<= 1e-5", error <= 1e-5)
    restore()
    found = sync_check(ctx, methods["normfree"])
    data["host_sync_normfree"] = found
    ctx.results.row(name, setting, "(d) host synchronisation (sync debug mode 'error')", found, "none",
                    None if found.startswith("n/a") else found == "none")
    return data


def _plan_graph_state(params: list[torch.Tensor]) -> str:
    """How `adaptive_clip_grad_` ran the Triton kernel for `params` last: from the plan's CUDA graph or not."""
    from normfree.agc import clip, gpu_kernel

    plans = [d.gpu_plan for d in clip._dispatches.values() if d.gpu_plan is not None and d.first and
             len(d.first) == len(params)]
    if not plans:
        return "n/a (no Triton plan)"
    states = [state for plan in plans for state in plan.graphs.values()]
    if any(isinstance(state, tuple) and state for state in states):
        return "yes"
    reason = gpu_kernel._graph_failure[0][:200] if gpu_kernel._graph_failure else "states: " + repr(states)[:100]
    return f"no ({reason})"
