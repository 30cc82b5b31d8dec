"""AGC fused into one pass over weights and gradients: the CPU kernel in csrc/agc_cpu.c.

`adaptive_clip_grad_` hands this module the parameters whose weight and gradient are
contiguous float32 or float64 CPU tensors. The kernel reads each unit's weight and gradient
once and rewrites the gradient only where the unit clips, which costs about one copy of the
gradients (the torch-ops path costs three passes). It is compiled on first use with the system
C compiler (~0.2 s), cached under ``$XDG_CACHE_HOME/normfree`` (``~/.cache/normfree``) by a hash
of source, compiler and flags, and loaded with ctypes: no build step at install time. Where it
cannot be built (no compiler) `adaptive_clip_grad_` warns once and uses torch ops; set
``NORMFREE_CPU_KERNEL=0`` to choose torch ops without the warning.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("csrc") / "agc_cpu.c"
# OpenMP threads the kernel; a compiler without it (Apple's clang) still builds a one-thread kernel.
_FLAG_SETS = (["-O3", "-fPIC", "-shared", "-fopenmp"], ["-O3", "-fPIC", "-shared"])
_FUNCTIONS = {torch.float32: "agc_clip_float32", torch.float64: "agc_clip_float64"}
_ARGTYPES = [ctypes.c_int64] + [ctypes.c_void_p] * 4 + [ctypes.c_double] * 3 + [ctypes.c_void_p] * 3


def cache_dir() -> Path:
    """Where built kernels are kept: $XDG_CACHE_HOME/normfree, else ~/.cache/normfree."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "normfree"


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")


def _build(compiler: list[str], flags: list[str]) -> Path:
    """Compile the kernel into the cache (atomically: processes may build it at the same time)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, *map(str.encode, compiler + flags), platform.machine().encode()]))
    target = cache_dir() / f"agc_cpu-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([*compiler, *flags, str(SOURCE), "-o", partial, "-lm"],
                           check=True, capture_output=True, text=True, timeout=120)
            os.replace(partial, target)
        finally:
            Path(partial).unlink(missing_ok=True)
    return target


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with one warning) when it cannot be built here."""
    if os.environ.get("NORMFREE_CPU_KERNEL", "1") == "0":
        return None
    errors = []
    for flags in _FLAG_SETS:
        try:
            library = ctypes.CDLL(str(_build(_compiler(), flags)))
        except (OSError, subprocess.SubprocessError) as error:
            detail = getattr(error, "stderr", None) or str(error)
            last_line = detail.strip().splitlines()[-1] if detail.strip() else error
            errors.append(f"{shlex.join(_compiler() + flags)}: {last_line}")
            continue
        for name in _FUNCTIONS.values():
            getattr(library, name).argtypes = _ARGTYPES
        return library
    warnings.warn(
        "normfree could not build its fused CPU AGC kernel, so AGC on the CPU uses torch ops "
        "(1.8x slower on nfnet_f0): "
        + "; ".join(errors) + ". Install a C compiler (or set CC), or set NORMFREE_CPU_KERNEL=0 to silence this.",
        RuntimeWarning, stacklevel=4,  # the caller of adaptive_clip_grad_
    )
    return None


def supports(param: Tensor) -> bool:
    """Whether the kernel can clip `param.grad`: both contiguous on the CPU, float32 or float64, same shape."""
    grad = param.grad
    return (
        param.device.type == "cpu" and param.dtype in _FUNCTIONS and grad.dtype == param.dtype
        and not grad.is_sparse and grad.shape == param.shape
        and param.is_contiguous() and grad.is_contiguous()
    )


def _pointers(tensors: list[Tensor]) -> Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


def clip_(params: list[Tensor], units: list[int], clipping: float, eps: float,
          grad_norm_floor: float) -> tuple[Tensor, Tensor]:
    """AGC on `params` (all `supports`-ed, one dtype; `units[i]` units each) in one kernel call.

    Returns the clipped and the non-finite unit counts per parameter (int64, CPU).
    """
    library = load()
    first_unit = torch.tensor([0] + units, dtype=torch.int64).cumsum(0)
    unit_size = torch.tensor([p.numel() // n if n else 0 for p, n in zip(params, units)], dtype=torch.int64)
    weights, grads = _pointers(params), _pointers([p.grad for p in params])
    outcome = torch.empty(sum(units), dtype=torch.int8)
    clipped, nonfinite = torch.empty(len(params), dtype=torch.int64), torch.empty(len(params), dtype=torch.int64)
    getattr(library, _FUNCTIONS[params[0].dtype])(
        len(params), weights.data_ptr(), grads.data_ptr(), first_unit.data_ptr(), unit_size.data_ptr(),
        float(clipping), float(eps), float(grad_norm_floor),
        outcome.data_ptr(), clipped.data_ptr(), nonfinite.data_ptr(),
    )
    return clipped, nonfinite
