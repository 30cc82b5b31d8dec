"""The patched forwards of per-sample AGC: installed on a model's modules, when they record, and their calls checked.

Each module an engine takes gets that engine's forward as an instance attribute (shadowing its class's), which runs
the module's own forward unless the recording is on (`active`: between `start` and `stop`, with gradients enabled,
and not while the generic engine runs a forward pass again in its backward pass, `bypassed`). Every recorded call is
checked (`note_call`): a layer must be called once per forward pass of the model, on rows that are its examples.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["Recording"]


class Recording:
    """The forwards installed on `model`'s modules (`install`, `remove`) and when they record.

    `on_forward_pass` is called at the start of every forward pass of `model` (not of its modules' forwards run
    again by the generic engine's backward pass).
    """

    def __init__(self, model: nn.Module, on_forward_pass: Callable[[], None]):
        self._on_forward_pass = on_forward_pass
        self._active = False
        self._bypass = 0
        self._installed: list[nn.Module] = []
        self._names: dict[nn.Module, str] = {}
        self._called: set[nn.Module] = set()  # installed modules called in the current forward pass
        self._examples: int | None = None  # the examples of the current forward pass: dim 0 of the model's input
        self._root_hook = model.register_forward_pre_hook(self._new_forward_pass)

    def install(self, module: nn.Module, name: str, forward: Callable) -> None:
        """Run `forward` in place of `module`'s own (named `name` in messages) until `remove`."""
        module.forward = forward  # instance attribute: shadows the class's forward
        self._installed.append(module)
        self._names[module] = name or type(module).__name__

    def remove(self) -> None:
        """Restore every module's own forward."""
        for module in self._installed:
            module.__dict__.pop("forward", None)
        self._installed = []
        self._root_hook.remove()

    def describe(self, module: nn.Module) -> str:
        """An installed module as messages name it: its name in the model and its class."""
        return f"{self._names[module]} ({type(module).__name__})"

    def _new_forward_pass(self, model: nn.Module, args: tuple) -> None:
        if self._bypass:  # the generic engine running the model's forward again, per example, in its backward pass
            return
        self._called.clear()
        self._on_forward_pass()
        self._examples = next((a.shape[0] for a in args if isinstance(a, Tensor) and a.dim() > 0), None)

    def note_call(self, module: nn.Module, examples: int) -> None:
        """Refuse, and remove itself, where a layer is called twice in one forward pass of the model (weights reused),
        or on a tensor whose dim 0 (`examples`) is not the model input's (examples merged with positions, or
        sequence-first).

        Each call's backward would clip that use's per-example gradient, but an example's gradient
        is the sum over the uses: clipped per use is not clipped per example. (Calling the whole
        model twice before one backward pass is not detected.) The engines take dim 0 of a layer's input for the
        examples: any other rows would be clipped one by one, as if they were examples.
        """
        if module in self._called:
            self.remove()
            raise ValueError(
                f"per-sample AGC: {self.describe(module)} was called twice in one forward "
                "pass, so its weights are reused; per-sample AGC would clip each use separately instead of each "
                "example's summed gradient. Turn per_sample off for this model"
            )
        if self._examples is not None and examples != self._examples:
            self.remove()
            raise ValueError(
                f"per-sample AGC: {self.describe(module)} was called on {examples} rows "
                f"(dim 0 of its input), but the model's input holds {self._examples} examples; per-sample AGC clips "
                "each row of a layer's input as one example, so every layer must hold the examples along dim 0 (not "
                "sequence-first, not merged with positions). Turn per_sample off for this model"
            )
        self._called.add(module)

    def start(self) -> None:
        """From now on, forward passes with gradients enabled clip per example in their backward pass."""
        self._active = True

    def stop(self) -> None:
        self._active = False

    def active(self) -> bool:
        """Whether an installed forward records now (else it runs the module's own forward)."""
        return self._active and not self._bypass and torch.is_grad_enabled()

    @contextmanager
    def bypassed(self) -> Iterator[None]:
        """Within the block, the installed forwards run the modules' own (the generic engine's forward passes)."""
        self._bypass += 1
        try:
            yield
        finally:
            self._bypass -= 1
