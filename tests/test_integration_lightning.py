"""normfree.integrations.lightning.AGCCallback on a real Lightning Trainer (a tiny LightningModule, on the CPU).

An observer callback listed before AGC's snapshots the weights and the whole step's gradient in
``on_before_optimizer_step``; the weights at the next step (or at the end) show the update SGD (lr 1) applied, which
must be the float64 reference AGC update of that gradient: in fp32, under gradient accumulation (clipped once per
step), and with 16-mixed's GradScaler (loss scale 2**12, float16 autocast on the CPU), including a fused optimizer,
which Lightning leaves scaled at that hook."""
import warnings

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

from normfree.integrations.lightning import AGCCallback  # noqa: E402
from step_reference import CLIPPING, assert_update, batches, expected_update, loss_of, snapshot, tiny_model  # noqa: E402

CLASSIFIER = {"net.2.weight"}


class TinyModule(L.LightningModule):
    def __init__(self, fused=False):
        super().__init__()
        self.net, self.fused = tiny_model(), fused

    def training_step(self, batch, batch_idx):
        return loss_of(self.net, *batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0, fused=self.fused)


class Observer(L.Callback):
    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        # a fused optimizer's gradients are still scaled here (Lightning leaves their unscaling to the step)
        factor = scaler.get_scale() if scaler is not None and pl_module.fused else 1.0
        self.steps.append({"before": snapshot(pl_module),
                           "grads": {n: p.grad / factor for n, p in pl_module.named_parameters()}})


def fit(agc, accumulation=2, steps=3, precision="32-true", fused=False, data=None, clip_val=None):
    module = TinyModule(fused)
    observer = Observer()
    plugins = ([MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**12))]
               if precision == "16-mixed" else [])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, accumulate_grad_batches=accumulation,
                        precision=None if plugins else precision, plugins=plugins, callbacks=[observer, agc],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=clip_val)
    data = data or batches(accumulation * steps, seed=10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat([x for x, _ in data]),
                                                                        torch.cat([y for _, y in data])),
                                         batch_size=len(data[0][1]))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|GPU available).*")
        trainer.fit(module, train_dataloaders=loader)
    return observer, module, trainer


@pytest.mark.parametrize("precision, fused", [("32-true", False), ("16-mixed", False), ("16-mixed", True)],
                         ids=["fp32", "16-mixed", "16-mixed-fused"])
def test_update_is_the_reference_agc_update_once_per_accumulated_step(precision, fused):
    agc = AGCCallback(clipping=CLIPPING)
    observer, module, _ = fit(agc, precision=precision, fused=fused)
    assert len(observer.steps) == 3 and len(agc.history) == 3  # one clip per optimizer step, not per batch
    afters = [step["before"] for step in observer.steps[1:]] + [snapshot(module)]
    clipped_total = 0
    for step, after in zip(observer.steps, afters):
        update, clipped = expected_update({n[len("net."):]: w for n, w in step["before"].items()},
                                          {n[len("net."):]: g for n, g in step["grads"].items()},
                                          {n[len("net."):] for n in CLASSIFIER})
        assert clipped > 0
        assert_update(step["before"], after, {f"net.{n}": u for n, u in update.items()})
        clipped_total += clipped
    assert int(agc.history.clipped().sum()) == clipped_total


def test_a_step_the_fp16_scaler_skips_is_neither_clipped_nor_counted():
    agc = AGCCallback(clipping=CLIPPING)
    data = batches(2, seed=10)
    data[0][0][0, 0] = float("inf")
    observer, module, trainer = fit(agc, accumulation=1, steps=2, precision="16-mixed", data=data)
    assert trainer.precision_plugin.scaler.get_scale() == 2.0**11  # the first step was skipped
    assert len(observer.steps) == 2 and len(agc.history) == 1
    assert all(torch.equal(observer.steps[1]["before"][n], w) for n, w in observer.steps[0]["before"].items())


@pytest.mark.bad_input
def test_lightnings_own_clipping_is_named():
    with pytest.warns(UserWarning, match="gradient_clip_val=0.5.*after AGC"):
        fit(AGCCallback(clipping=CLIPPING), accumulation=1, steps=1, clip_val=0.5)
