#!/usr/bin/env python
"""normfree on one CUDA GPU in under 5 minutes: one script, one table (``python benchmarks/gpu.py``).

Sections, each in its own try/except (an error is recorded in the results and the next section runs):

1. AGC on nfnet_f0's real gradients (fp32): one copy of all gradients (the memory floor), timm's
   `adaptive_clip_grad`, normfree's torch-ops path, `normfree.adaptive_clip_grad_` and the latter
   replayed from a CUDA graph; its error against a float64 reference written here from the paper's
   rule; whether it synchronises with the host.
2. nfnet_f0 training step (bs 64, 192 px, bf16 autocast, channels-last, SGD-Nesterov): no AGC,
   normfree's AGC, timm's, and normfree's fastai callback driven by a stand-in learner.
3. Per-sample AGC step against the ordinary AGC step: time, peak memory, exactness against a loop
   over examples; every entry of `PER_SAMPLE_VARIANTS` is timed; host time per phase of both steps and
   per launch of a layer's graph; a profiler table of one setting.
4. ``normfree train`` on the bundled digits in fp32, fp16 and bf16, as subprocesses; in this process, the
   learner it builds and a plain fastai one in fp32 and fp16 (host time per batch, kernels per batch).
5. Weight standardisation of nfnet_f0's and nf_resnet50's WS convs, forward + backward, bf16 autocast: timm's
   batch norm on the weights + gain multiply + autocast's cast against normfree's fused kernels (run second, a few
   seconds).

Each section is a module (`gpu_agc`, `gpu_train_step`, `gpu_per_sample`, `gpu_train`, `gpu_standardization`), on
the timers, sizes, models and results table of `gpu_common`; this script runs them.

Times are CUDA-event medians after warm-up; ratios are taken within this run. Full results go to
``--out`` (``gpu_bench.json``, rewritten after every section, and ``gpu_bench.md``); the Markdown table
is printed last. Without CUDA it prints one skip line and exits 0; ``--cpu-smoke`` runs every section
at tiny sizes on the CPU instead (to test the code paths, not to measure).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from gpu_agc import section_agc
from gpu_common import FULL, QUICK, ROOT, S1, S2, S3, S4, S5, Context, Results, log, short_error
from gpu_per_sample import PER_SAMPLE_VARIANTS, section_per_sample
from gpu_standardization import section_standardization
from gpu_train import section_cli
from gpu_train_step import section_train_step

SKIP_LINE = "benchmarks/gpu.py: skipped, no CUDA device"
BUDGET_S = 330  # a section that would start later than this is skipped


SECTIONS = [(S1, section_agc), (S5, section_standardization), (S2, section_train_step), (S3, section_per_sample),
            (S4, section_cli)]


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as error:  # noqa: BLE001
        return f"unavailable ({type(error).__name__})"


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def metadata(device: torch.device, args: argparse.Namespace) -> dict:
    cuda = device.type == "cuda"
    return dict(
        device=torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if cuda else None,
        torch=torch.__version__, triton=_version("triton"), timm=_version("timm"), fastai=_version("fastai"),
        python=platform.python_version(), commit=_git_commit(), quick=args.quick, cpu_smoke=args.cpu_smoke,
        cudnn_benchmark=torch.backends.cudnn.benchmark, started=time.strftime("%Y-%m-%d %H:%M:%S"),
        per_sample_variants=PER_SAMPLE_VARIANTS,
        # what decides whether float32 matmuls and convolutions run in TF32 (the exactness rows depend on it)
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        tf32_environment={k: v for k, v in os.environ.items() if "TF32" in k},
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-bench-output"), help="folder for the results")
    parser.add_argument("--quick", action="store_true", help="every section at tiny sizes (a smoke test)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the quick sizes on the CPU (tests the code paths)")
    parser.add_argument("--sections", default="1,2,3,4,5", help="comma-separated section numbers to run")
    parser.add_argument("--per-sample", default="", metavar="TEXT",
                        help="section 3: only the settings whose label contains TEXT (e.g. 'nf_resnet26')")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(SKIP_LINE, flush=True)
        return 0
    sys.path.insert(0, str(ROOT))  # normfree from this checkout, installed or not
    if args.cpu_smoke:
        args.quick = True
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    args.out = args.out.resolve()  # the CLI runs of section 4 have another working directory
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out, metadata(device, args), judge=not args.cpu_smoke)
    ctx = Context(device, QUICK if args.quick else FULL, args.out, results, args.per_sample)
    log(f"device {results.meta['device']}; torch {torch.__version__}, triton {results.meta['triton']}, "
        f"timm {results.meta['timm']}; commit {results.meta['commit']}; out {args.out}; float32 matmul precision "
        f"{results.meta['float32_matmul_precision']}, TF32 environment {results.meta['tf32_environment'] or 'none'}")
    wanted = {x.strip() for x in args.sections.split(",")}
    start = time.perf_counter()
    for key, function in SECTIONS:
        if key.split()[0] not in wanted:
            continue
        if time.perf_counter() - start > BUDGET_S:
            results.sections[key] = dict(skipped=f"time budget of {BUDGET_S} s spent")
            results.row(key, "", "SKIPPED", f"time budget of {BUDGET_S} s spent")
            results.save()
            continue
        log(f"section {key} ...")
        began = time.perf_counter()
        try:
            data = function(ctx)
            error = None
        except Exception as caught:  # noqa: BLE001 - record and go on
            data, error = {}, traceback.format_exc()
            results.row(key, "", "ERROR", short_error(caught))
            log(f"section {key} FAILED: {short_error(caught)}")
        wall = time.perf_counter() - began
        results.sections[key] = dict(wall_s=wall, error=error, data=data)
        results.row(key, "", "section wall time", f"{wall:.1f} s")
        gc.collect()
        if device.type == "cuda":
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception:  # noqa: BLE001 - a broken context shows in the next section's error
                pass
        results.save()
        log(f"section {key} done in {wall:.1f} s")
    results.meta["total_s"] = time.perf_counter() - start
    results.save()
    log(f"all done in {results.meta['total_s']:.1f} s; results in {args.out / 'gpu_bench.json'}")
    print()
    print(f"normfree GPU benchmark: {results.meta['device']}, torch {results.meta['torch']}, "
          f"triton {results.meta['triton']}, timm {results.meta['timm']}, commit {results.meta['commit'][:12]}")
    print()
    print(results.table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
