"""Normalizer-free fastai Learners: timm's NF models with a BN-free head, AGC attached.

`vision_learner(dls, "nfnet_f0")` puts fastai's default head on the body, and that head holds two
BatchNorm1d layers: the "normalizer-free" model is then neither normalizer-free nor usable for
per-example gradients. `nf_learner` keeps timm's own head instead: global pool, dropout, Linear,
the classifier weight drawn from N(0, 0.01) (Brock et al. 2021, Sec. 4.1 / Appendix).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import fastai.callback.schedule  # noqa: F401  (Learner.fit_one_cycle, fine_tune)
import torch
from fastai.data.core import DataLoaders
from fastai.data.transforms import Normalize
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from torch import nn

from ..agc.rule import DEFAULT_CLIPPING
from ..data.loaders import StandardiseImages
from ..models.compiled import compile_model
from ..models.convert import to_normfree
from ..models.factory import body_head_splitter, build_model, normalizer_free_archs
from ..models.fast_nf import fast_nf
from ..models.weights import load_weights, saved_conversion
from .callback import AGC
from .optim import fast_adam

__all__ = ["nf_learner"]


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
    if pipeline is None:
        warnings.warn(f"these DataLoaders take no batch transforms: normalise inputs yourself with mean={mean}, "
                      f"std={std}, the statistics the weights were trained with", stacklevel=3)
    elif not pipeline.filter(lambda t: isinstance(t, (Normalize, StandardiseImages))):  # normalised already
        dls.add_tfms([Normalize.from_stats(mean, std)], "after_batch")


def nf_learner(
    dls: DataLoaders,
    arch: str | Callable,
    pretrained: bool = False,
    weights: str | Path | None = None,
    agc: float | None = DEFAULT_CLIPPING,
    n_out: int | None = None,
    drop_rate: float = 0.0,
    loss_func: Callable | None = None,
    model_kwargs: dict | None = None,
    convert: bool | str | dict | None = False,
    fast: bool = True,
    compile: bool | dict = False,
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
      `normfree.to_normfree`: a mode, ``"nf"`` (BatchNorm dropped, Scaled WS convolutions, NF residual blocks
      with SkipInit) or ``"fold"`` (BatchNorm folded into the convolutions: with `pretrained`/`weights`, the
      model computes in eval mode what the loaded BatchNorm model computes); True for ``"nf"``; or a dict of
      to_normfree's keyword arguments (``{"mode": "fold"}``, ``{"alpha": 0.5, "skipinit": False}``); False or None
      for no conversion.
      The converted model has no normalisation layer, so per-sample AGC works on it. `weights` saved from a
      converted model (`normfree.save_weights` with `conversion`, as `normfree.train` saves them) are loaded
      into the converted model instead, and need `convert` to be that same conversion (ValueError otherwise).
    - `fast`: compute timm's NF blocks (every NF family above) with their scalars folded into the
      weight-standardised convolutions (`normfree.fast_nf`: the same function, parameters and state_dict, fewer passes
      over the activations); False keeps timm's forward. Models without NF blocks are unaffected. Per-sample AGC
      works on either, but on a folded model its forward rounds differently from the model's own (`normfree train
      --per-sample` therefore leaves the model unfolded).
    - `compile`: compile the model's forward with torch.compile, in place (`normfree.models.compiled.compile_model`:
      parameters, state_dict and export unchanged; a warning and eager execution where it cannot compile); True for
      torch.compile's defaults, or a dict of its options (``{"mode": "max-autotune"}``). Not with per-sample AGC.
    Other keyword arguments go to `Learner` (metrics, cbs, wd, ...). The optimizer (`opt_func`) is by default
    `normfree.learner.optim.fast_adam`: fastai's Adam computed by torch's fused kernel.
    """
    n_in, n_classes = _data_shape(dls)
    if n_out is None:
        if n_classes is None:
            raise ValueError("cannot tell the number of classes from these DataLoaders: pass n_out=")
        n_out = n_classes
    elif n_classes is not None and n_out != n_classes:
        raise ValueError(f"n_out={n_out} but the data has {n_classes} classes; leave n_out out to use {n_classes}")
    if convert is None:
        convert = False
    if not isinstance(convert, (bool, str, dict)):
        raise TypeError(f"convert must be True, False, a to_normfree mode ('nf', 'fold') or a dict of to_normfree's "
                        f"options, got {convert!r}")
    if convert is not False and isinstance(arch, str) and arch in normalizer_free_archs():
        raise ValueError(f"convert: {arch} is already normalizer-free; drop convert, or give a BatchNorm arch "
                         f"such as 'resnet18'")
    options = None if convert is False else {"mode": "nf", **({} if convert is True else {"mode": convert}
                                                              if isinstance(convert, str) else convert)}
    converted_weights = saved_conversion(weights) if weights is not None else None
    if weights is not None and converted_weights is not None:  # they fit the converted model only: convert, load
        if options != converted_weights:
            raise ValueError(f"weights file {str(weights)!r} holds {arch} converted by to_normfree with "
                             f"{converted_weights}, so it loads into that model only: give convert={converted_weights} "
                             f"(normfree train: the same --to-normfree, --alpha, --skipinit), not {convert!r}")
        model = to_normfree(build_model(arch, n_out, n_in, False, None, drop_rate, model_kwargs), **options)
        load_weights(model, weights, arch if isinstance(arch, str) else None)
    else:
        model = build_model(arch, n_out, n_in, pretrained, weights, drop_rate, model_kwargs)
        model = model if options is None else to_normfree(model, **options)
    if not isinstance(fast, bool):
        raise TypeError(f"fast must be True (fold the NF blocks' scalars, normfree.fast_nf) or False, got {fast!r}")
    if fast:
        fast_nf(model)
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be True, False or a dict of torch.compile's options, got {compile!r}")
    if compile is not False:
        compile_model(model, **({} if compile is True else compile))
    if pretrained or weights is not None:
        _add_input_normalisation(dls, model, n_in)
    loss_func = loss_func or getattr(dls.train_ds, "loss_func", None) or CrossEntropyLossFlat()
    learn = Learner(dls, model, loss_func=loss_func, splitter=body_head_splitter, **{"opt_func": fast_adam, **kwargs})
    if agc is not None:
        learn.add_cb(AGC(agc))
    if pretrained or weights is not None:
        learn.freeze()
    return learn
