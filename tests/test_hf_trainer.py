"""The DropBlock schedule in the Hugging Face Trainer: a random-init CNN from transformers on
random data, two epochs, once straight and once stopped after the first epoch's checkpoint
and resumed from it: the rates at every step are the schedule's, and the same both ways."""

from __future__ import annotations

import functools
import importlib
import importlib.util

import pytest
import torch

import dropblock_fx as dbx

# transformers takes ~3 s to import: it is imported when a test here runs, not when the suite
# is collected (by every xdist worker)
pytestmark = [
    pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("transformers", "accelerate")),
                       reason="needs transformers and accelerate (the hf extra)"),
    pytest.mark.usefixtures("one_thread"),
]


class _Lazy:
    def __getattr__(self, name: str):
        return getattr(importlib.import_module("transformers"), name)


transformers = _Lazy()


def DropBlockScheduleCallback():  # noqa: N802 - stands for the class
    from dropblock_fx.integrations.hf import DropBlockScheduleCallback

    return DropBlockScheduleCallback()

SAMPLES, BATCH, EPOCHS = 8, 2, 2
STEPS = SAMPLES // BATCH * EPOCHS


def small_cnns():
    T = transformers
    return {
        "resnet": lambda: T.ResNetForImageClassification(T.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=3)),
        "convnext": lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=3)),
        "regnet": lambda: T.RegNetForImageClassification(T.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], groups_width=8, num_labels=3)),
        "mobilenet_v2": lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            depth_multiplier=0.25, num_labels=3, image_size=32)),
        "efficientnet": lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(
            width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, num_labels=3, image_size=32)),
    }


def model_with_dropblock(name: str = "resnet"):
    torch.manual_seed(0)
    model = small_cnns()[name]()
    return dbx.apply_dropblock(model, "last-two-stages", input_size=[3, 32, 32], block_size=3)


class RandomImages(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(SAMPLES, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 3, (SAMPLES,), generator=g)

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


@functools.lru_cache(maxsize=None)
def _stop_after_first_epoch() -> type:
    class StopAfterFirstEpoch(transformers.TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            control.should_training_stop = True

    return StopAfterFirstEpoch


def train(out, *, resume=None, stop=False):
    """Returns the rates ({module: drop_prob}) at every training forward, and the model."""
    model = model_with_dropblock()
    drops = {n: m for n, m in model.named_modules() if isinstance(m, dbx.DropBlockNd)}
    seen = []
    model.register_forward_pre_hook(
        lambda mod, args: seen.append({n: m.drop_prob for n, m in drops.items()}) if mod.training else None
    )
    args = transformers.TrainingArguments(
        output_dir=str(out), num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH, learning_rate=1e-3,
        save_strategy="epoch", logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    callbacks = [DropBlockScheduleCallback()] + ([_stop_after_first_epoch()()] if stop else [])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomImages(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return seen, model


def test_trainer_rates_at_every_step_with_checkpoint_and_resume(tmp_path):
    straight, model = train(tmp_path / "straight")
    assert len(straight) == STEPS
    for k, rates in enumerate(straight):
        want = {n: m.target_drop_prob * k / STEPS for n, m in model.named_modules() if isinstance(m, dbx.DropBlockNd)}
        assert rates == pytest.approx(want, abs=1e-12), f"step {k}"

    first, _ = train(tmp_path / "broken", stop=True)
    assert len(first) == STEPS // EPOCHS
    checkpoint = tmp_path / "broken" / f"checkpoint-{STEPS // EPOCHS}"
    assert checkpoint.is_dir()
    second, _ = train(tmp_path / "broken", resume=str(checkpoint))
    assert len(first) + len(second) == STEPS
    for k, (resumed, want) in enumerate(zip(first + second, straight)):
        assert resumed == pytest.approx(want, abs=1e-12), f"step {k}"


class _State:
    global_step, max_steps, num_train_epochs = 3, 12, 2


@pytest.mark.parametrize("name", ["resnet", "convnext", "regnet", "mobilenet_v2", "efficientnet"])
def test_callback_drives_each_transformers_cnn(name):
    model = model_with_dropblock(name)
    drops = [m for m in model.modules() if isinstance(m, dbx.DropBlockNd)]
    assert drops, f"no DropBlock placed in {name}"
    cb = DropBlockScheduleCallback()
    cb.on_train_begin(None, _State(), None, model=model)
    assert cb.schedule.progress == pytest.approx(3 / 12)
    assert all(m.drop_prob == pytest.approx(m.target_drop_prob * 3 / 12) for m in drops)
    out = model.train()(pixel_values=torch.randn(2, 3, 32, 32), labels=torch.tensor([0, 1]))
    out.loss.backward()


def test_unscheduled_warning_names_the_trainer_callback(tmp_path):
    model = model_with_dropblock()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=BATCH, save_strategy="no",
        logging_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RandomImages())
    with pytest.warns(UserWarning, match="callbacks=\\[dropblock_fx.integrations.hf.DropBlockScheduleCallback"):
        trainer.train()
