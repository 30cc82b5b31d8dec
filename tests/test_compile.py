"""`compile_model` / `nf_learner(compile=...)`: torch.compile in place, and eager execution where it cannot compile.

The fits use torch.compile's ``aot_eager`` backend (dynamo's graph capture and AOTAutograd, no code generation:
seconds, not minutes, on a CPU); one test compiles a tiny model with the default backend (inductor's C++ code)."""
import copy
import pickle
import warnings
from functools import cache

import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from torch import nn
from torch.utils.data import TensorDataset

from normfree import nf_learner
from normfree.models.compiled import compile_model, is_compiled

AOT_EAGER = {"backend": "aot_eager"}


def image_dls() -> DataLoaders:
    """32 random 3-channel 8 px images of 4 classes, in batches of 16, unshuffled (torch.compile draws from the global
    RNG as it compiles: shuffles would differ between a compiled and an eager run)."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8, generator=generator), torch.arange(32) % 4
    dls = DataLoaders(DataLoader(TensorDataset(x, y), bs=16), DataLoader(TensorDataset(x[:16], y[:16]), bs=16))
    dls.c = 4
    return dls


def _fit(learn: Learner) -> dict[str, torch.Tensor]:
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    return learn.model.state_dict()


def _learner(compile) -> Learner:
    torch.manual_seed(0)
    return nf_learner(image_dls(), "nf_resnet_tiny", compile=compile)


@cache
def _eager_fit() -> dict[str, torch.Tensor]:
    return _fit(_learner(False))


@pytest.mark.slow
def test_compiled_fit_trains_as_eager_with_the_same_state_dict_keys():
    eager = _eager_fit()
    learn = _learner(AOT_EAGER)
    assert is_compiled(learn.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback
        compiled = _fit(learn)
    assert list(compiled) == list(eager)
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, msg=key)
    restored = pickle.loads(pickle.dumps(learn.model))  # fastai's export pickles the model: the compiled call stays out
    assert not is_compiled(restored)


def _failing_backend(graph, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


@pytest.mark.slow
def test_a_model_that_cannot_compile_warns_and_trains_eagerly():
    eager = _eager_fit()
    learn = _learner({"backend": _failing_backend})
    with pytest.warns(UserWarning, match="torch.compile could not compile SmallResNet .RuntimeError: this backend "
                                         "cannot compile anything.; it runs uncompiled"):
        fallen_back = _fit(learn)
    assert not is_compiled(learn.model)
    for key, value in eager.items():
        assert torch.equal(fallen_back[key], value), key


@pytest.mark.slow
def test_default_backend_compiles_a_tiny_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    compile_model(model)
    x = torch.randn(5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = model(x)
    out.sum().backward()
    reference(x).sum().backward()
    assert is_compiled(model)
    torch.testing.assert_close(out, reference(x))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


@pytest.mark.bad_input
def test_per_sample_agc_refuses_a_compiled_model():
    learn = _learner(AOT_EAGER)
    with pytest.raises(ValueError, match="compiled forward"):
        learn.agc(0.01, per_sample=True)


@pytest.mark.bad_input
def test_compile_must_be_a_bool_or_options():
    with pytest.raises(TypeError, match="compile must be True, False or a dict"):
        nf_learner(image_dls(), "nf_resnet_tiny", compile="yes")


def test_learner_loss_is_the_compiled_models():
    """fastai's Learner calls the model as a module: the compiled forward runs (a counting backend sees it)."""
    calls = []

    def counting_backend(graph, example_inputs):
        calls.append(len(example_inputs))
        return graph.forward

    model = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 4))
    compile_model(model, backend=counting_backend)
    learn = Learner(image_dls(), model, loss_func=CrossEntropyLossFlat())
    _fit(learn)
    assert calls
