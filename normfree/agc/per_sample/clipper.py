"""The per-sample clipper: which engine takes each of a model's modules, which modules are refused, and installing.

`PerSampleClipper` replaces the forward of every module that owns trained parameters by the engine
for its kind (`engines`): `layers` (linear and convolution layers: book-keeping, Bu et al. 2023, and ghost
norms, Li et al. 2022), `containers` (scalar gains of container modules) or `generic` (torch.func, for
everything else: Embedding, LayerNorm, layer scales, nn.MultiheadAttention, a module that uses its own
parameters in forward, such as timm's VisionTransformer with its cls_token and pos_embed, taken whole). The
engines use only their `context.EngineContext`: the rule they call with per-example unit norms (`example_rule`,
which counts in `tally`), the patched forwards' `recording`, and the layers' CUDA `graphs`. Also here: the checks
that make per-example gradients meaningful (`check_examples_independent`; `loss_scale.loss_reduction`), and
`check_supported_modules`, which refuses, before anything is trained, the modules no engine can take:
recurrent layers (nn.RNN, nn.GRU, nn.LSTM) and randomness (dropout) inside a module the generic engine takes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

from torch import Tensor, nn

from ..clip import ClipStats
from ..rule import DEFAULT_EPS
from ..sharded import sharded_parameter_name
from .containers import container_forward
from .context import EngineContext
from .example_rule import ExampleRule
from .generic import generic_forward, random_modules
from .graphs import LayerGraphs
from .layers import Layer, layer_forward
from .recording import Recording
from .tally import ClipTally

__all__ = ["PerSampleClipper", "check_examples_independent", "check_supported_modules", "engines"]

_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)


def check_examples_independent(batchnorms: nn.Module | list[tuple[str, nn.Module]]) -> None:
    """ValueError if a BatchNorm layer is in training mode: it couples the examples of a batch.

    Takes a model, or the (name, module) BatchNorm layers of one, listed once (`PerSampleClipper`
    checks before every training batch, since a model can be switched to training mode at any time).
    """
    if isinstance(batchnorms, nn.Module):
        batchnorms = [(n, m) for n, m in batchnorms.named_modules() if isinstance(m, _BATCHNORMS)]
    names = [name for name, module in batchnorms if module.training]
    if not names:
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise ValueError(
        f"per-sample AGC needs examples that do not interact, but the model has BatchNorm layers in training mode "
        f"({shown}): BatchNorm couples the examples of a batch, so per-example gradients do not exist. Use a "
        "normalizer-free model (normfree.nf_learner with e.g. 'nf_resnet26' or 'nf_resnet_small'), or turn "
        "per_sample off"
    )


def _engine_of(module: nn.Module) -> str | None:
    """Which engine takes `module`'s own trained parameters: "layers", "containers", "generic", or None (it has none).

    A module whose children have parameters keeps its own fast only when they are scalar gains, which act
    elementwise on a batch (`containers`); any other parameter of its own may be used in any way (a cls_token
    concatenated, a vector reshaped), so the generic engine takes the module whole.
    """
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if not own:
        return None
    if not any(True for child in module.children() for _ in child.parameters()):
        return "layers" if Layer.of(module) is not None else "generic"
    return "containers" if all(p.numel() == 1 for p in own) else "generic"


def _below(name: str, ancestor: str) -> bool:
    return ancestor == "" or name.startswith(ancestor + ".")


def engines(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, engine) of each module of `model` that per-sample AGC installs an engine on, top down
    (`_engine_of`); the modules below one that the generic engine takes whole are part of it."""
    found, whole = [], []
    for name, module in model.named_modules():
        engine = None if any(_below(name, w) for w in whole) else _engine_of(module)
        if engine is not None:
            found.append((name, module, engine))
            if engine == "generic":
                whole.append(name)
    return found


def _qualified(*names: str) -> str:
    return ".".join(n for n in names if n) or "the model"


def check_supported_modules(model: nn.Module) -> None:
    """ValueError naming the first module of `model` that per-sample AGC cannot clip, why, and what to do.

    - Recurrent layers (nn.RNN, nn.GRU, nn.LSTM): only the generic engine could take them, and torch.func
      cannot take their per-example gradients (its vmap fails on nn.RNN and nn.GRU and runs nn.LSTM one
      example at a time on the CPU).
    - A module that draws random numbers (dropout, drop-path with a rate above 0) inside one that the
      generic engine takes: its backward pass runs the forward pass again, with new masks.
    - Sharded parameters (DTensors: FSDP2's fully_shard, tensor parallelism): the engines take whole weights.
    """
    sharded = sharded_parameter_name(model)
    if sharded is not None:
        raise ValueError(f"per-sample AGC cannot clip sharded parameters ({sharded} is sharded: FSDP2's fully_shard "
                         "or tensor parallelism): train with DistributedDataParallel, or turn per_sample off (ordinary "
                         "AGC clips sharded models)")
    for name, module in model.named_modules():
        if isinstance(module, nn.RNNBase):
            raise ValueError(
                f"per-sample AGC cannot clip {_qualified(name)} ({type(module).__name__}): torch.func cannot take "
                "per-example gradients of PyTorch's recurrent layers (nn.RNN, nn.GRU, nn.LSTM). Turn per_sample off "
                "(ordinary AGC clips the batch's gradient)"
            )
    for name, module, engine in engines(model):
        random = random_modules(module) if engine == "generic" else []
        if random:
            inner, drawer = random[0]
            raise ValueError(
                f"per-sample AGC takes {_qualified(name)} ({type(module).__name__}) through torch.func, which runs "
                f"its forward pass again per example in the backward pass, but {_qualified(name, inner)} "
                f"({type(drawer).__name__}) draws random masks there, so they would differ from the forward pass's. "
                "Set its rate to 0, or turn per_sample off"
            )


def _check_untied(model: nn.Module) -> None:
    """ValueError if a trained parameter belongs to several modules: each module's engine would clip its own use."""
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        for n, p in [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]:
            if id(p) in owners:
                raise ValueError(
                    f"per-sample AGC cannot clip parameters shared by several modules: {owners[id(p)]} is also "
                    f"{name}.{n}; untie them or turn per_sample off"
                )
            owners[id(p)] = f"{name}.{n}" if name else n


def _forward(context: EngineContext, module: nn.Module, engine: str) -> Callable:
    """The forward of `engine` (see `engines`) for `module`."""
    if engine == "layers":
        return partial(layer_forward, context, Layer.of(module), module)
    if engine == "containers":
        return partial(container_forward, context, module)
    return partial(generic_forward, context, module)


class PerSampleClipper:
    """Installs per-sample AGC on the layers of `model`; `clipping` maps parameters (by id) to lambda.

    Parameters missing from `clipping` (the excluded classifier weight, parameters the optimizer
    does not train) get their ordinary summed gradient. While gradients
    are enabled (between `start()` and `stop()`), the model's layers compute clipped per-example sums in their
    backward pass; the
    per-example gradient of a layer output is the signal reaching it divided by `grad_scale`,
    which the caller sets (before the backward pass) to d(loss as backpropagated) / d(one example's
    loss term): e.g. loss-scale / batch-size for a mean loss under a grad scaler.

    It puts together what the engines use (`context.EngineContext`): the rule and its tally (`example_rule`,
    `tally`), the patched forwards (`recording`) and the layers' CUDA graphs (`graphs`).
    """

    def __init__(self, model: nn.Module, clipping: dict[int, float], eps: float = DEFAULT_EPS):
        self._batchnorms = [(n, m) for n, m in model.named_modules() if isinstance(m, _BATCHNORMS)]
        self.check_examples_independent()
        check_supported_modules(model)
        _check_untied(model)
        self.tally = ClipTally([p for p in model.parameters() if id(p) in clipping])
        self.rule = ExampleRule(clipping, self.tally, eps)
        self.graphs = LayerGraphs(self.tally)
        self.recording = Recording(model, self.rule.new_forward_pass)
        context = EngineContext(self.rule, self.recording, self.graphs)
        for name, module, engine in engines(model):
            self.recording.install(module, name, _forward(context, module, engine))

    @property
    def grad_scale(self) -> Tensor | None:
        """d(loss as backpropagated) / d(one example's loss term), set before each backward pass."""
        return self.rule.grad_scale

    @grad_scale.setter
    def grad_scale(self, value: Tensor | None) -> None:
        self.rule.grad_scale = value

    def check_examples_independent(self) -> None:
        """ValueError if one of the model's BatchNorm layers is now in training mode."""
        check_examples_independent(self._batchnorms)

    def start(self) -> None:
        """From now on, forward passes with gradients enabled clip per example in their backward pass."""
        self.recording.start()

    def stop(self) -> None:
        self.recording.stop()

    def remove(self) -> None:
        """Restore every layer's own forward."""
        self.recording.remove()

    def collect(self, groups: Sequence[Sequence[Tensor]]) -> list[ClipStats]:
        """Statistics since the last `collect`, per group of parameters (units are example-units), then reset.

        In a distributed run they count the examples of all processes: each process clipped only its own.
        """
        return self.tally.collect(groups)
