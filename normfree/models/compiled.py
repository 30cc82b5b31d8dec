"""`compile_model`: a model's forward compiled by torch.compile in place, with a fallback to eager where it cannot.

In place, as ``nn.Module.compile()`` does it: the module, its parameters, state_dict keys, hooks and pickling stay
those of the model (pickling and deepcopy drop the compiled forward), so AGC, checkpoints and fastai's export see
the model they would see uncompiled. torch.compile compiles at the first call; where that fails (no C++ compiler
for the CPU backend, an operation the backend does not support, an unsupported Python version), the failure is a
warning that names the reason, and the model runs eagerly from then on.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["compile_model", "is_compiled"]


def is_compiled(model: nn.Module) -> bool:
    """Whether `model`'s forward runs compiled (`compile_model` or ``nn.Module.compile()``)."""
    return model._compiled_call_impl is not None


def compile_model(model: nn.Module, **options: Any) -> nn.Module:
    """Compile `model`'s forward in place with ``torch.compile(**options)`` (e.g. ``backend``, ``mode``,
    ``dynamic``); returns `model`. If compiling fails at the first call, warns once with the reason and runs that
    call, and every later one, eagerly."""
    if not torch._dynamo.is_dynamo_supported():
        warnings.warn("torch.compile is not supported on this Python / platform: the model runs uncompiled",
                      stacklevel=2)
        return model
    compiled = torch.compile(model._call_impl, **options)

    def call(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as error:
            # a backend's own failure comes wrapped in BackendCompilerFailed
            cause = getattr(error, "inner_exception", None) or error.__cause__ or error
            reason = next(iter(str(cause).strip().splitlines()), "")
            warnings.warn(f"torch.compile could not compile {type(model).__name__} ({type(cause).__name__}: "
                          f"{reason}); it runs uncompiled, as it would without compile", stacklevel=2)
            model._compiled_call_impl = None
            return model._call_impl(*args, **kwargs)

    # what nn.Module.compile() sets, with the fallback around it
    model._compiled_call_impl = call
    return model
