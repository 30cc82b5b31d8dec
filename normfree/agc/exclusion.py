"""Which parameters AGC leaves alone: the final classifier, and whatever the user excludes.

DeepMind's NFNet code clips every parameter except the final classifier's weight (Brock et al.
2021, Sec. 4.1: "we found it was also beneficial not to clip the final linear layer"); its bias,
all gains and the squeeze-excite linears are clipped. timm's training script leaves out the
classifier's weight and bias.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from torch import Tensor, nn

from ..models.classifier import find_classifier, unwrap_model

__all__ = ["as_exclusions", "clipped_parameters", "excluded_parameters", "Exclusion", "SkipClassifier"]

SkipClassifier = Literal["weight", "weight_and_bias"] | None
# An exclusion is a parameter-name pattern (fnmatch glob, or a module name for all its
# parameters), a module (all its parameters), or a predicate called as f(name, parameter).
Exclusion = str | nn.Module | Callable[[str, Tensor], bool]
_SKIP_CLASSIFIER_CHOICES = ("weight", "weight_and_bias", None)


def as_exclusions(exclude: Exclusion | Iterable[Exclusion] | None) -> list[Exclusion]:
    """`exclude` as a list: None is none, one pattern, module or predicate is a list of one."""
    if exclude is None:
        return []
    if isinstance(exclude, (str, nn.Module)) or callable(exclude):
        return [exclude]
    return list(exclude)


def _pattern_matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _excluded_by(model: nn.Module, exclusion: Exclusion) -> list[Tensor]:
    named = list(model.named_parameters())
    if isinstance(exclusion, str):
        found = [p for name, p in named if _pattern_matches(exclusion, name)]
        if not found:
            examples = ", ".join(name for name, _ in named[:3] + named[-2:])
            raise ValueError(
                f"exclude pattern {exclusion!r} matches no parameter of the model; parameter names look "
                f"like: {examples}"
            )
        return found
    if isinstance(exclusion, nn.Module):
        owned = {id(p) for p in exclusion.parameters()}
        if not owned or not any(id(p) in owned for _, p in named):
            raise ValueError(f"exclude module {type(exclusion).__name__} has no parameters in the model")
        return [p for _, p in named if id(p) in owned]
    if callable(exclusion):
        return [p for name, p in named if exclusion(name, p)]
    raise TypeError(
        f"exclude items must be parameter-name patterns (str), modules or predicates f(name, param); "
        f"got {type(exclusion).__name__}"
    )


def check_skip_classifier(skip_classifier: SkipClassifier) -> None:
    if skip_classifier not in _SKIP_CLASSIFIER_CHOICES:
        raise ValueError(
            f"skip_classifier must be one of {_SKIP_CLASSIFIER_CHOICES} ('weight': DeepMind's rule, "
            f"'weight_and_bias': timm's, None: clip it too), got {skip_classifier!r}"
        )


def excluded_parameters(
    model: nn.Module, skip_classifier: SkipClassifier = "weight", exclude: Iterable[Exclusion] = ()
) -> list[Tensor]:
    """The parameters of `model` that AGC must not clip.

    `skip_classifier` picks which of the final classifier's parameters are left alone (see
    `find_classifier`); `exclude` adds patterns, modules or predicates. A pattern or module that
    matches nothing is an error, so a typo cannot silently clip what was meant to be excluded.
    """
    check_skip_classifier(skip_classifier)
    model = unwrap_model(model)
    found: list[Tensor] = []
    if skip_classifier is not None:
        classifier = find_classifier(model)
        if classifier is not None:
            found.append(classifier.weight)
            if skip_classifier == "weight_and_bias" and isinstance(getattr(classifier, "bias", None), Tensor):
                found.append(classifier.bias)
    for exclusion in exclude:
        found.extend(_excluded_by(model, exclusion))
    return found


def clipped_parameters(
    model: nn.Module, param_lists: Sequence[Sequence[Tensor]], skip_classifier: SkipClassifier = "weight",
    exclude: Iterable[Exclusion] = (),
) -> list[list[tuple[str, Tensor]]]:
    """Per optimizer param group, the (name, parameter) pairs AGC clips: the trained ones (`requires_grad`), less
    `excluded_parameters`. Parameters outside `model` are named ``group<g>.param<i>``."""
    model = unwrap_model(model)
    excluded = {id(p) for p in excluded_parameters(model, skip_classifier, exclude)}
    names = {id(p): name for name, p in model.named_parameters()}
    return [
        [(names.get(id(p), f"group{g}.param{i}"), p) for i, p in enumerate(group)
         if p.requires_grad and id(p) not in excluded]
        for g, group in enumerate(param_lists)
    ]
