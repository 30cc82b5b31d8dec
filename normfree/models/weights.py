"""Local weight files: load them into a model offline, with errors that say what disagrees.

Accepted files:
- a state dict (timm's hub files, `torch.save(model.state_dict())`): ``.safetensors``, ``.pth``, ``.pt``, ``.bin``;
- a fastai `learn.save()` file (``{"model": state_dict, "opt": ...}``);
- a normfree `save_weights()` file: ``.safetensors`` whose metadata records the architecture and, for a model
  converted by `normfree.to_normfree`, the conversion (`saved_conversion`: such weights fit the converted model only);
- a `learn.export()` file (``.pkl``): a whole pickled Learner. Unpickling runs code from the file,
  so only load ``.pkl`` files you made yourself.
"""
from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import torch
from timm.models import adapt_input_conv
from torch import Tensor, nn

from .classifier import find_classifier

__all__ = ["save_weights", "load_weights", "saved_conversion"]

# The one list of weight-file suffixes; the command line's help and the settings' checks quote it.
SAVE_SUFFIX = ".safetensors"  # what `save_weights` writes
EXPORT_SUFFIX = ".pkl"  # a `learn.export()` file: a whole pickled Learner
STATE_DICT_SUFFIXES = (SAVE_SUFFIX, ".pth", ".pt", ".bin")
WEIGHT_SUFFIXES = (*STATE_DICT_SUFFIXES, EXPORT_SUFFIX)
WEIGHT_FILES = f"{', '.join(STATE_DICT_SUFFIXES)} or a learn.export() {EXPORT_SUFFIX}"  # in words, for messages


def save_weights(model: nn.Module, path: str | Path, arch: str | None = None,
                 conversion: dict[str, object] | None = None) -> Path:
    """Write `model`'s weights as ``.safetensors``, recording `arch` so a mismatch is named on load, and `conversion`:
    the `normfree.to_normfree` keyword arguments (JSON values) that made `model` from `arch`, if it was converted
    (read back by `saved_conversion`)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SAVE_SUFFIX:
        raise ValueError(f"save_weights writes {SAVE_SUFFIX} files; got {path.name!r}")
    tensors = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    metadata = {"normfree_arch": arch or "", **({_CONVERSION_KEY: json.dumps(conversion)} if conversion else {})}
    save_file(tensors, str(path), metadata=metadata)
    return path


_CONVERSION_KEY = "normfree_conversion"


def saved_conversion(path: str | Path) -> dict[str, object] | None:
    """The `normfree.to_normfree` keyword arguments recorded by `save_weights` in the weights file `path` (those of a
    converted model: its weights fit the model that `arch` becomes by that conversion, not `arch` itself); None for
    any other file."""
    from safetensors import SafetensorError, safe_open

    if Path(path).suffix != SAVE_SUFFIX:
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get(_CONVERSION_KEY)
    except SafetensorError:
        return None  # not readable: load_weights says why
    return json.loads(recorded) if recorded else None


def read_weights(path: str | Path) -> tuple[dict[str, Tensor], str | None]:
    """(state dict, architecture recorded in the file or None) from any accepted file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ValueError(f"weights file {path.name!r}: expected one of {', '.join(WEIGHT_SUFFIXES)}")
    if path.suffix == SAVE_SUFFIX:
        return _read_safetensors(path)
    content = _torch_load(path)
    exported_model = getattr(content, "model", None)
    if isinstance(exported_model, nn.Module):  # learn.export()
        content = exported_model.state_dict()
    if isinstance(content, dict) and isinstance(content.get("model"), dict):  # fastai learn.save()
        content = content["model"]
    if not isinstance(content, dict) or not all(isinstance(v, Tensor) for v in content.values()):
        raise ValueError(f"weights file {str(path)!r} holds a {type(content).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in content.items()}, None


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], str | None]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            arch = (f.metadata() or {}).get("normfree_arch") or None
            return {k: f.get_tensor(k) for k in f.keys()}, arch
    except SafetensorError as error:  # a text file, a truncated download, another format renamed...
        raise ValueError(f"weights file {str(path)!r} is not a readable safetensors file ({error}): truncated or "
                         f"corrupt? Download or save it again (normfree.save_weights writes one), or give the "
                         f"file its own suffix (.pth for torch.save)") from None


# torch.save writes a zip archive (since torch 1.6) or, in the legacy format, a pickle (first byte 0x80).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _torch_load(path: Path) -> object:
    """torch.load with normfree's own messages: a file torch.save did not write is named as such, and the
    advice torch gives for files it refuses (``weights_only=False``, unsafe) is not passed on."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(_TORCH_MAGIC):
        found = "the file is empty" if not head else f"this file begins {head!r}"
        raise ValueError(f"weights file {str(path)!r} is not a PyTorch checkpoint (torch.save writes a zip archive "
                         f"or a pickle; {found}): point to a file written by torch.save, learn.save, learn.export or "
                         f"normfree.save_weights")
    try:
        return torch.load(path, map_location="cpu", weights_only=path.suffix != EXPORT_SUFFIX)
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error):
            raise ValueError(f"weights file {str(path)!r} is not a readable PyTorch checkpoint ({error}): truncated "
                             f"or corrupt?") from None
        raise ValueError(f"weights file {str(path)!r} holds Python objects other than tensors, which normfree does "
                         f"not unpickle (that could run code from the file). Save the weights alone: "
                         f"torch.save(model.state_dict(), ...) or normfree.save_weights(model, 'w.safetensors'); "
                         f"a learn.export() file of your own is read as .pkl") from None
    except Exception as error:  # a truncated zip, a broken pickle stream...
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"weights file {str(path)!r} is not a readable PyTorch checkpoint ({reason}): truncated or "
                         f"corrupt? Save or download it again") from None


def _names_of(model: nn.Module, module: nn.Module) -> list[str]:
    prefix = next(name for name, m in model.named_modules() if m is module)
    return [f"{prefix}.{name}" for name, _ in module.named_parameters()]


def _fit_to_model(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Re-create the head when the class count differs; adapt the first conv to the input channels."""
    expected = model.state_dict()
    classifier = find_classifier(model)
    if classifier is not None:
        head_keys = _names_of(model, classifier)
        saved = [state[k].shape for k in head_keys if k in state]
        wanted = [expected[k].shape for k in head_keys if k in state]
        if saved and all(s[1:] == w[1:] for s, w in zip(saved, wanted)) and saved[0][0] != wanted[0][0]:
            classes = state[head_keys[0]].shape[0]
            warnings.warn(f"weights have a {classes}-class classifier; keeping a new one for "
                          f"{wanted[0][0]} classes", stacklevel=3)
            state = {k: v for k, v in state.items() if k not in head_keys}
    first_conv = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    key = f"{first_conv}.weight" if isinstance(first_conv, str) else None
    if key in state and key in expected and state[key].ndim == 4 and state[key].shape[1] != expected[key].shape[1]:
        state = {**state, key: _adapt_input_channels(state[key], expected[key].shape[1])}
    return state


def _adapt_input_channels(weight: Tensor, in_chans: int) -> Tensor:
    """First-conv weight for `in_chans` inputs: timm's rule from RGB; from gray, the filter shared by all."""
    if weight.shape[1] == 1:  # a gray image copied to every channel then gives the same response
        return weight.repeat(1, in_chans, 1, 1) / in_chans
    if weight.shape[1] == 3:
        return adapt_input_conv(in_chans, weight)
    return weight  # no rule: reported as a shape mismatch


def _mismatch_report(model: nn.Module, state: dict[str, Tensor], fresh: set[str]) -> str | None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and k not in fresh]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(expected[k].shape)}"
              for k in state if k in expected and state[k].shape != expected[k].shape]
    parts = [f"{len(keys)} {what} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"
             for what, keys in (("keys missing from the file", missing), ("unexpected keys", unexpected),
                                ("shapes differ", shapes)) if keys]
    return "; ".join(parts) or None


def load_weights(model: nn.Module, path: str | Path, arch: str | None = None) -> nn.Module:
    """Load a local weights file into `model` in place and return it.

    The classifier is re-created (kept as initialised) when the file's class count differs, and
    the first conv is adapted when the input channels differ (from RGB with timm's
    `adapt_input_conv`; from gray by sharing the filter across channels).
    Anything else that does not fit raises ValueError listing the keys and shapes that disagree.
    """
    state, saved_arch = read_weights(path)
    state = _fit_to_model(model, state)
    fresh = set(model.state_dict()) - set(state)
    classifier = find_classifier(model)
    allowed_fresh = set(_names_of(model, classifier)) if classifier is not None else set()
    report = _mismatch_report(model, state, fresh & allowed_fresh)
    if report:
        origin = f" (saved from {saved_arch!r})" if saved_arch and saved_arch != arch else ""
        raise ValueError(f"weights file {str(path)!r}{origin} does not fit {arch or type(model).__name__}: {report}")
    model.load_state_dict(state, strict=False)
    return model
