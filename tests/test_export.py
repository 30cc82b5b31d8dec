"""An NF learner survives learn.export() / load_learner() with its callbacks, and predicts one image."""
import torch
from fastai.learner import load_learner
from fastai.metrics import accuracy
from fastai.vision.data import ImageDataLoaders

from normfree import AGC, nf_learner, write_digits_image_folder


def test_export_round_trip_and_predict(tmp_path):
    folder = write_digits_image_folder(tmp_path / "digits", size=16, per_class=8)
    dls = ImageDataLoaders.from_folder(folder, valid_pct=0.25, seed=0, bs=16)
    learn = nf_learner(dls, "test_nfnet", agc=0.05, metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    learn.export(tmp_path / "learner.pkl")
    loaded = load_learner(tmp_path / "learner.pkl")
    assert [cb.clipping for cb in loaded.cbs if isinstance(cb, AGC)] == [0.05]
    test_dl = learn.dls.test_dl(sorted(folder.rglob("*.png"))[:12])
    with learn.no_bar():
        expected, _ = learn.get_preds(dl=test_dl)
    with loaded.no_bar():
        actual, _ = loaded.get_preds(dl=loaded.dls.test_dl(sorted(folder.rglob("*.png"))[:12]))
    assert torch.equal(actual, expected)
    image = sorted(folder.glob("7/*.png"))[0]
    with loaded.no_bar():
        label, index, probabilities = loaded.predict(image)
    assert label in [str(d) for d in range(10)] and probabilities.shape == (10,)
    assert float(probabilities.sum()) == torch.tensor(1.0).item() or abs(float(probabilities.sum()) - 1) < 1e-5
