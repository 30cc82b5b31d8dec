"""Normalizer-free fastai Learners: timm's NF models with a BN-free head, AGC attached.

`vision_learner(dls, "nfnet_f0")` puts fastai's default head on the body, and that head holds two
BatchNorm1d layers: the "normalizer-free" model is then neither normalizer-free nor usable for
per-example gradients. `nf_learner` keeps timm's own head instead: global pool, dropout, Linear,
the classifier weight drawn from N(0, 0.01) (Brock et al. 2021, Sec. 4.1 / Appendix).
"""
from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from pathlib import Path

import fastai.callback.schedule  # noqa: F401  (Learner.fit_one_cycle, fine_tune)
import timm
import torch
from fastai.callback.hook import num_features_model
from fastai.data.core import DataLoaders
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.vision.learner import create_body
from timm.layers import ClassifierHead
from torch import nn

from .callback import AGC
from .convert import to_normfree
from .classifier import classifier_init_std, find_classifier, init_classifier_
from .data import StandardiseImages
from .weights import load_weights

__all__ = ["nf_learner", "build_model", "normalizer_free_archs", "body_head_splitter", "unknown_arch_error"]

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


def unknown_arch_error(arch: str) -> ValueError:
    """The error for an architecture name timm does not know, suggesting names from all of timm's:
    the same name written with other separators or case first (``resnet-18`` -> ``resnet18``), then
    close normalizer-free names, then other close names."""
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
    return ValueError(f"unknown arch {arch!r}; {hint} (normfree.normalizer_free_archs() lists the normalizer-free "
                      f"names, timm.list_models() all)")


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
    body = create_body(arch(weights="DEFAULT" if pretrained else None), n_in, pretrained)
    return nn.Sequential(body, ClassifierHead(num_features_model(body), n_out, pool_type="avg", drop_rate=drop_rate))


def build_model(
    arch: str | Callable, n_out: int, n_in: int = 3, pretrained: bool = False, weights: str | Path | None = None,
    drop_rate: float = 0.0,
    model_kwargs: dict | None = None,
) -> nn.Module:
    """The model `nf_learner` trains: a timm arch by name (NF or not), or a torchvision model function.

    The head is global pooling, dropout and a Linear initialised N(0, 0.01) (or the model's own
    ``classifier_init_std``) — no normalisation layer. `weights` loads a local file (see `load_weights`).
    `model_kwargs` go to `timm.create_model` (e.g. ``{"skipinit": True}`` for normfree's small ResNets).
    """
    if isinstance(arch, str):
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
    head = {id(p) for p in find_classifier(model).parameters()}
    params = list(model.parameters())
    return [[p for p in params if id(p) not in head], [p for p in params if id(p) in head]]


def _data_shape(dls: DataLoaders) -> tuple[int, int | None]:
    """(input channels, number of classes) of image DataLoaders, or a clear error."""
    batch = dls.one_batch()
    images = batch[0]
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"nf_learner needs image batches shaped [batch, channels, height, width]; the first "
                         f"element of a batch of these DataLoaders is {shape}")
    return images.shape[1], getattr(dls, "c", None)


def _add_input_normalisation(dls: DataLoaders, model: nn.Module, n_in: int) -> None:
    """Normalise inputs with the stats the weights were trained with (timm config), as vision_learner does."""
    config = getattr(model, "pretrained_cfg", None) or {}
    mean, std = config.get("mean"), config.get("std")
    if mean is None or len(mean) != n_in:
        return
    pipeline = getattr(dls.after_batch, "fs", None)
    if isinstance(dls.after_batch, StandardiseImages):  # normfree's tensor data: standardised already
        return
    if pipeline is None:
        warnings.warn(f"these DataLoaders take no batch transforms: normalise inputs yourself with mean={mean}, "
                      f"std={std}, the statistics the weights were trained with", stacklevel=3)
    elif not pipeline.filter(lambda t: isinstance(t, Normalize)):
        dls.add_tfms([Normalize.from_stats(mean, std)], "after_batch")


def nf_learner(
    dls: DataLoaders,
    arch: str | Callable,
    pretrained: bool = False,
    weights: str | Path | None = None,
    agc: float | None = 0.01,
    n_out: int | None = None,
    drop_rate: float = 0.0,
    loss_func: Callable | None = None,
    model_kwargs: dict | None = None,
    convert: bool | dict = False,
    **kwargs,
) -> Learner:
    """A fastai `Learner` for a normalizer-free model (or a BatchNorm baseline, e.g. ``"resnet26"``).

    - `arch`: a timm name (every NF family: nfnet_f0-f7, dm_nfnet_*, nfnet_l0, eca_nfnet_l*, nf_regnet_b*,
      nf_resnet*, nf_seresnet*, nf_ecaresnet*, test_nfnet, normfree's small family) or a torchvision function.
    - `pretrained`: timm's hub weights; `weights`: a local file instead (see `load_weights`). With either,
      the inputs get the model's normalisation stats and the body starts frozen, as `vision_learner` does.
    - `agc`: AGC's lambda (the callback skips the classifier weight); None trains without AGC.
    - `n_out`: number of outputs, by default the data's class count.
    - `model_kwargs`: extra arguments of the timm model (``{"skipinit": True}``).
    - `convert`: make a BatchNorm `arch` (``"resnet18"``, a torchvision ResNet, an xresnet...) normalizer-free:
      the model is built as without it (weights loaded, classifier initialised), then converted by
      `normfree.to_normfree` (BatchNorm dropped, Scaled WS convolutions, NF residual blocks with SkipInit).
      True for its defaults, or a dict of its keyword arguments (``{"alpha": 0.5, "skipinit": False}``).
      The converted model has no normalisation layer, so per-sample AGC works on it.
    Other keyword arguments go to `Learner` (metrics, opt_func, lr, cbs, wd, ...).
    """
    n_in, n_classes = _data_shape(dls)
    if n_out is None:
        if n_classes is None:
            raise ValueError("cannot tell the number of classes from these DataLoaders: pass n_out=")
        n_out = n_classes
    elif n_classes is not None and n_out != n_classes:
        raise ValueError(f"n_out={n_out} but the data has {n_classes} classes; leave n_out out to use {n_classes}")
    if convert is not False and not isinstance(convert, (bool, dict)):
        raise TypeError(f"convert must be True, False or a dict of to_normfree's options, got {convert!r}")
    if convert is not False and isinstance(arch, str) and arch in normalizer_free_archs():
        raise ValueError(f"convert: {arch} is already normalizer-free; drop convert, or give a BatchNorm arch "
                         f"such as 'resnet18'")
    model = build_model(arch, n_out, n_in, pretrained, weights, drop_rate, model_kwargs)
    if convert is not False:
        model = to_normfree(model, **({} if convert is True else convert))
    if pretrained or weights is not None:
        _add_input_normalisation(dls, model, n_in)
    loss_func = loss_func or getattr(dls.train_ds, "loss_func", None) or CrossEntropyLossFlat()
    learn = Learner(dls, model, loss_func=loss_func, splitter=body_head_splitter, **kwargs)
    if agc is not None:
        learn.add_cb(AGC(agc))
    if pretrained or weights is not None:
        learn.freeze()
    return learn
