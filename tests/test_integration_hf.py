"""normfree.integrations.huggingface.AGCCallback on a real transformers.Trainer (a tiny torch model, no downloads).

An observer callback listed before AGC's snapshots the weights and the whole step's gradient in
``on_pre_optimizer_step`` and the weights in ``on_optimizer_step``: the update SGD (lr 1) applied must be the float64
reference AGC update of that gradient, at every step, under gradient accumulation (clipped once per step) and with
accelerate's fp16 GradScaler (loss scale 2**12; the CPU has none of its own, so the test gives the Trainer's
accelerator one)."""
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from normfree.integrations.huggingface import AGCCallback  # noqa: E402
from step_reference import CLIPPING, assert_update, expected_update, loss_of, snapshot, tiny_model  # noqa: E402

CLASSIFIER = {"net.2.weight"}


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = tiny_model()

    def forward(self, x, labels):
        return {"loss": loss_of(self.net, x, labels), "logits": self.net(x)}


class Examples(torch.utils.data.Dataset):
    def __init__(self, n=16):
        generator = torch.Generator().manual_seed(1)
        self.x, self.y = 3 * torch.randn(n, 4, generator=generator), torch.randint(0, 3, (n,), generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Observer(transformers.TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        self.steps.append({"before": snapshot(model), "grads": grads})

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps[-1]["after"] = snapshot(model)


def train(tmp_path, agc, accumulation=2, steps=3, fp16=False, examples=None):
    model = TinyClassifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, fp16=fp16, per_device_train_batch_size=4, max_steps=steps,
        gradient_accumulation_steps=accumulation, max_grad_norm=0, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    observer = Observer()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=examples or Examples(),
                                   optimizers=(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)),
                                   callbacks=[observer, agc])
    if fp16:  # accelerate gives a CPU no GradScaler: this one scales the loss by 2**12 and unscales as on a GPU
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        trainer.accelerator.native_amp = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(PreTrainedModel|num_items_in_batch).*")
        trainer.train()
    return observer, trainer


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16-scaler"])
def test_update_is_the_reference_agc_update_once_per_accumulated_step(tmp_path, fp16):
    agc = AGCCallback(clipping=CLIPPING)
    observer, trainer = train(tmp_path, agc, fp16=fp16)
    assert len(observer.steps) == 3 and len(agc.history) == 3  # one clip per optimizer step, not per micro-batch
    clipped_total = 0
    for step in observer.steps:
        update, clipped = expected_update({n[len("net."):]: w for n, w in step["before"].items()},
                                          {n[len("net."):]: g for n, g in step["grads"].items()},
                                          {n[len("net."):] for n in CLASSIFIER})
        assert clipped > 0
        assert_update(step["before"], step["after"], {f"net.{n}": u for n, u in update.items()})
        clipped_total += clipped
    assert int(agc.history.clipped().sum()) == clipped_total
    if fp16:
        assert trainer.accelerator.scaler.get_scale() == 2.0**12  # no step was skipped


def test_a_step_the_fp16_scaler_skips_is_neither_clipped_nor_counted(tmp_path):
    agc = AGCCallback(clipping=CLIPPING)
    examples = Examples(8)
    examples.x[0, 0] = float("inf")  # the gradient of the step with example 0 is NaN: the scaler skips it
    observer, trainer = train(tmp_path, agc, accumulation=1, steps=2, fp16=True, examples=examples)
    skipped = [i for i, step in enumerate(observer.steps)
               if all(torch.equal(step["before"][n], step["after"][n]) for n in step["before"])]
    assert len(skipped) == 1 and trainer.accelerator.scaler.get_scale() == 2.0**11
    assert len(agc.history) == 1


@pytest.mark.bad_input
def test_the_trainers_own_norm_clipping_is_named(tmp_path):
    model = TinyClassifier()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=1, report_to=[],
                                          save_strategy="no", logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Examples(4),
                                   callbacks=[AGCCallback(clipping=CLIPPING)])
    with pytest.warns(UserWarning, match="global norm to 1.0 before AGC.*max_grad_norm=0"):
        trainer.train()
