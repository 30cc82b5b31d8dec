"""normfree: Normalizer-Free Networks and Adaptive Gradient Clipping for fastai.

The top level holds what a user calls; everything else is importable from its subpackage (each with its own
``__all__``): `normfree.agc`, `normfree.models`, `normfree.data`, `normfree.learner`, `normfree.app.*`. The
layers, bottom up (docs/ARCHITECTURE.md): `utils`, `models` and `agc` (torch and timm only), `data` and `learner`
(fastai), `app` (the runs, reports and the command line).

`import normfree` loads the first three only and changes nothing outside normfree: no warnings filter, no
third-party class (it registers normfree's small ResNets, ``nf_resnet_*`` / ``bn_resnet_*``, with timm's model
registry, so that ``timm.create_model`` finds them). The fastai-level names load on first use, so that a script
using AGC alone never imports fastai or pyplot; that first use, like ``import normfree.learner``, installs the
fastai integration (``Learner.agc``, ``Learner.agc_find``, ``Learner.to_mixed_precision`` and the guard around
``Learner.fit``; see `normfree.learner`).
"""
import importlib
from typing import TYPE_CHECKING

from .app import startup  # noqa: F401  (first: the `normfree` command's Ctrl-C while importing torch is one line)

__version__ = "0.1.0"

_PUBLIC = {  # the top level: name -> the module it comes from. `__all__` and the lazy loading both derive from it.
    # the AGC core
    "ClipStats": "normfree.agc",
    "adaptive_clip_grad_": "normfree.agc",
    "agc_hook": "normfree.agc",
    "unitwise_norm": "normfree.agc",
    # models and conversion
    "build_model": "normfree.models",
    "fast_nf": "normfree.models",
    "fuse_standardization": "normfree.models",
    "save_weights": "normfree.models",
    "signal_propagation": "normfree.models",
    "to_normfree": "normfree.models",
    # fastai
    "AGC": "normfree.learner",
    "nf_learner": "normfree.learner",
    # runs and grids
    "ConfigError": "normfree.utils",
    "TrainConfig": "normfree.app.config",
    "compare": "normfree.app.compare",
    "train": "normfree.app.train",
}
if TYPE_CHECKING:  # `_PUBLIC` for type checkers, which cannot follow the loading below (tests/test_public_api.py)
    from .agc import ClipStats, adaptive_clip_grad_, agc_hook, unitwise_norm
    from .app.compare import compare
    from .app.config import TrainConfig
    from .app.train import train
    from .learner import AGC, nf_learner
    from .models import build_model, fast_nf, fuse_standardization, save_weights, signal_propagation, to_normfree
    from .utils import ConfigError

_CORE = ("normfree.utils", "normfree.models", "normfree.agc")  # torch and timm only: loaded by `import normfree`

__all__ = sorted(_PUBLIC)

for _name, _module in _PUBLIC.items():
    if _module.startswith(_CORE):
        globals()[_name] = getattr(importlib.import_module(_module), _name)
del _name, _module


def __getattr__(name: str):
    """A fastai-level name, loaded on first use; fastai's Learner gets normfree's integration then."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'normfree' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    importlib.import_module("normfree.learner")  # fastai is loaded now: its Learner gets normfree's methods
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
