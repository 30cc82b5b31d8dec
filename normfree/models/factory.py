"""The model factory: an architecture by name (timm's, ``torchvision:NAME`` or ``fastai:NAME``; normalizer-free or
not) or a torchvision model function, with a normalisation-free head (global pool, dropout, Linear initialised as
the NFNet papers do)."""
from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

import timm
from timm.layers import ClassifierHead
from torch import nn

from .classifier import classifier_init_std, find_classifier, init_classifier_
from .weights import load_weights

__all__ = ["build_model", "normalizer_free_archs", "body_head_splitter", "unknown_arch_error", "is_known_arch"]

LIBRARIES = ("torchvision", "fastai")  # the prefixes of ``library:NAME`` architecture names
_NF_PREFIXES = ("nfnet_", "dm_nfnet_", "eca_nfnet_", "nf_regnet_", "nf_resnet", "nf_seresnet", "nf_ecaresnet",
                "test_nfnet")


def normalizer_free_archs() -> list[str]:
    """Every normalizer-free architecture timm knows (normfree's small family included)."""
    return [name for name in timm.list_models() if name.startswith(_NF_PREFIXES)]


def _name_key(name: str) -> str:
    """A name as compared for suggestions: case and separators ignored (``ResNet-18`` ~ ``resnet18``)."""
    return "".join(ch for ch in name.lower() if ch not in "-_ .")


def _close_names(arch: str, names: list[str], n: int) -> list[str]:
    by_key: dict[str, list[str]] = {}
    for name in names:
        by_key.setdefault(_name_key(name), []).append(name)
    close = difflib.get_close_matches(_name_key(arch), list(by_key), n=n, cutoff=0.6)
    return [name for key in close for name in by_key[key]][:n]


def _library_names(library: str) -> list[str]:
    """The model names ``library:NAME`` accepts: torchvision's registry, fastai's xresnet family."""
    if library == "torchvision":
        import torchvision.models

        return torchvision.models.list_models(module=torchvision.models)
    from fastai.vision.models import xresnet

    return sorted(name for name in xresnet.__all__ if name.startswith("xres"))


def _split_library(arch: str) -> tuple[str, str] | None:
    """(library, model name) for ``torchvision:resnet18`` / ``fastai:xresnet18``; None for a timm name."""
    library, sep, name = arch.partition(":")
    return (library, name) if sep and library in LIBRARIES else None


def is_known_arch(arch: object) -> bool:
    """Whether `arch` names an architecture `build_model` builds: a timm name, ``torchvision:NAME`` or
    ``fastai:NAME``."""
    if not isinstance(arch, str):
        return False
    split = _split_library(arch)
    return arch in timm.list_models() if split is None else split[1] in _library_names(split[0])


def unknown_arch_error(arch: str) -> ValueError:
    """The error for an architecture name timm does not know, suggesting names from all of timm's:
    the same name written with other separators or case first (``resnet-18`` -> ``resnet18``), then
    close normalizer-free names, then other close names. For ``torchvision:NAME`` and ``fastai:NAME``, close names
    of that library."""
    split = _split_library(arch)
    if split is not None:
        library, name = split
        close = _close_names(name, _library_names(library), 6)
        hint = f"close names: {', '.join(f'{library}:{n}' for n in close)}" if close else (
            f"its models include: {', '.join(f'{library}:{n}' for n in _library_names(library)[:8])}, ...")
        return ValueError(f"unknown arch {arch!r}: {library} has no model {name!r}; {hint}")
    nf = normalizer_free_archs()
    nf_set = set(nf)
    everything = timm.list_models()
    same = [name for name in everything if _name_key(name) == _name_key(arch)]
    close = [name for name in _close_names(arch, nf, 4) + _close_names(arch, [m for m in everything
                                                                                if m not in nf_set], 4)
             if name not in same]
    if same:
        hint = f"did you mean {', '.join(same)}?" + (f" Other close names: {', '.join(close)}" if close else "")
    elif close:
        hint = f"close names: {', '.join(close)}"
    else:
        hint = f"normalizer-free names include: {', '.join(nf[:8])}, ..."
    return ValueError(f"unknown arch {arch!r}; {hint} (normfree.models.normalizer_free_archs() lists the "
                      f"normalizer-free names, timm.list_models() all; torchvision's and fastai's models are written "
                      f"torchvision:resnet18, fastai:xresnet18)")


def _library_model_function(library: str, name: str) -> Callable:
    """The model function of ``library:name``, called as torchvision's are (``weights="DEFAULT"`` or None)."""
    if library == "torchvision":
        import torchvision.models

        return torchvision.models.get_model_builder(name)
    from fastai.vision.models import xresnet

    function = getattr(xresnet, name)
    return lambda weights=None: function(pretrained=weights is not None)


def _timm_model(arch: str, n_out: int, n_in: int, pretrained: bool, drop_rate: float, model_kwargs: dict) -> nn.Module:
    if arch not in timm.list_models():
        raise unknown_arch_error(arch)
    kwargs = dict(num_classes=n_out, in_chans=n_in, drop_rate=drop_rate, **model_kwargs)
    if not pretrained:
        return timm.create_model(arch, **kwargs)
    try:
        return timm.create_model(arch, pretrained=True, **kwargs)
    except Exception as error:  # no weights published, hub unreachable, proxy refusal...
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise RuntimeError(
            f"could not load pretrained weights for {arch!r} ({type(error).__name__}: {reason}). Where the model hub "
            f"is unreachable, download the weights elsewhere and pass weights='path/to/model.safetensors' instead "
            f"of pretrained=True"
        ) from None


def _torchvision_model(arch: Callable, n_out: int, n_in: int, pretrained: bool, drop_rate: float) -> nn.Module:
    # fastai knows where each torchvision model's head starts; imported here so that the models need fastai
    # only for torchvision architectures
    from fastai.callback.hook import num_features_model
    from fastai.vision.learner import create_body

    body = create_body(arch(weights="DEFAULT" if pretrained else None), n_in, pretrained)
    return nn.Sequential(body, ClassifierHead(num_features_model(body), n_out, pool_type="avg", drop_rate=drop_rate))


def build_model(
    arch: str | Callable, n_out: int, n_in: int = 3, pretrained: bool = False, weights: str | Path | None = None,
    drop_rate: float = 0.0,
    model_kwargs: dict | None = None,
) -> nn.Module:
    """The model `nf_learner` trains: a timm arch by name (NF or not), torchvision's or fastai's by name
    (``"torchvision:resnet18"``, ``"fastai:xresnet18"``: fastai's body, this head), or a torchvision model function.

    The head is global pooling, dropout and a Linear initialised N(0, 0.01) (or the model's own
    ``classifier_init_std``) — no normalisation layer. `weights` loads a local file (see `load_weights`).
    `model_kwargs` go to `timm.create_model` (e.g. ``{"skipinit": True}`` for normfree's small ResNets).
    """
    if isinstance(arch, str) and (split := _split_library(arch)) is not None:
        if not is_known_arch(arch):
            raise unknown_arch_error(arch)
        if model_kwargs:
            raise TypeError(f"model_kwargs are for timm architectures, not {arch}")
        model = _torchvision_model(_library_model_function(*split), n_out, n_in, pretrained, drop_rate)
    elif isinstance(arch, str):
        model = _timm_model(arch, n_out, n_in, pretrained, drop_rate, model_kwargs or {})
    elif model_kwargs:
        raise TypeError("model_kwargs are for timm architectures given by name, not torchvision functions")
    elif callable(arch):
        model = _torchvision_model(arch, n_out, n_in, pretrained, drop_rate)
    else:
        raise TypeError(f"arch must be a timm model name or a torchvision model function, got {type(arch).__name__}")
    classifier = find_classifier(model)
    if not pretrained:
        init_classifier_(classifier, classifier_init_std(model))
    if weights is not None:
        load_weights(model, weights, arch if isinstance(arch, str) else None)
    return model


def body_head_splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """Two parameter groups, body then classifier, for freeze(), fine_tune() and discriminative lrs."""
    classifier = find_classifier(model)
    head = {id(p) for p in classifier.parameters()} if classifier is not None else set()
    params = list(model.parameters())
    return [[p for p in params if id(p) not in head], [p for p in params if id(p) in head]]
