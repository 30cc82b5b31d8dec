"""The final classifier: finding it in a model, and initialising it as the NFNet papers do."""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["CLASSIFIER_INIT_STD", "classifier_init_std", "find_classifier", "init_classifier_", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def find_classifier(model: nn.Module) -> nn.Module | None:
    """The model's final classifier layer, or None when it has none.

    timm models say which it is (`get_classifier()`); otherwise it is the last `nn.Linear` in
    module order, which for a fastai `vision_learner` model is the last layer of its head.
    """
    model = unwrap_model(model)
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module) and isinstance(getattr(head, "weight", None), Tensor):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


CLASSIFIER_INIT_STD = 0.01  # Brock et al. 2021, for features of unit variance


def init_classifier_(classifier: nn.Module | None, std: float = CLASSIFIER_INIT_STD) -> None:
    """Classifier weight ~ N(0, std), bias 0; the default std 0.01 is the NFNet papers' (Brock et al. 2021;
    zero init "could sometimes lead to instabilities"). A model may declare its own with a
    ``classifier_init_std`` attribute (see `classifier_init_std`). A classifier without a weight (timm's
    nn.Identity at 0 classes), or None (`find_classifier` found none), is left as it is."""
    if not isinstance(getattr(classifier, "weight", None), Tensor):
        return
    nn.init.normal_(classifier.weight, 0.0, std)
    if getattr(classifier, "bias", None) is not None:
        nn.init.zeros_(classifier.bias)


def classifier_init_std(model: nn.Module) -> float:
    """The std a model's classifier weight is drawn with: its own ``classifier_init_std``, else the papers'."""
    return getattr(unwrap_model(model), "classifier_init_std", CLASSIFIER_INIT_STD)
