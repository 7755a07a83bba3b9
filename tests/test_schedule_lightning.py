"""The Lightning hook (optional extra): skipped when Lightning is not installed."""

from __future__ import annotations

import functools
import importlib.util
import warnings

import pytest

from dropblock_fx import DropBlockNd, attach_schedule
from small_models import lightning_net_class

# Lightning takes ~3 s to import: it is imported when a test here runs, not when the suite is
# collected (by every xdist worker)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="needs lightning")

TOTAL = 8


@functools.lru_cache(maxsize=None)
def _lightning():
    import lightning.pytorch

    return lightning.pytorch


def DropBlockScheduleCallback(**kw):  # noqa: N802 - stands for the class
    from dropblock_fx.schedule.lightning import DropBlockScheduleCallback

    return DropBlockScheduleCallback(**kw)


def Net():  # noqa: N802 - stands for the class
    return lightning_net_class()(TOTAL * 2, target_drop_prob=0.2)


def _trainer(**kw):
    return _lightning().Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                                enable_model_summary=False, **kw)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_lightning_hook_follows_global_step():
    net = Net()
    sched = attach_schedule(net, total_steps=TOTAL, hook="lightning")
    from dropblock_fx.schedule.lightning import DropBlockScheduleCallback as Callback

    assert isinstance(sched.callback, Callback)
    _trainer(max_steps=TOTAL, enable_checkpointing=False, callbacks=[sched.callback]).fit(net)
    assert net.seen == pytest.approx([0.2 * k / TOTAL for k in range(TOTAL)])
    assert sched.count == TOTAL and net.body[1].drop_prob == pytest.approx(0.2)


def test_callback_attaches_itself_with_the_trainer_length():
    net = Net()
    callback = DropBlockScheduleCallback(schedule={"name": "step", "params": {"steps": 2}})
    _trainer(max_epochs=1, enable_checkpointing=False, callbacks=[callback]).fit(net)
    assert callback.schedule.length == TOTAL
    assert net.seen == [0.0] * (TOTAL // 2) + [0.2] * (TOTAL // 2)
    assert all(isinstance(m, DropBlockNd) for m in callback.schedule.modules.values())


def test_resume_from_a_lightning_checkpoint(tmp_path):
    full = Net()
    _trainer(max_steps=TOTAL, enable_checkpointing=False,
             callbacks=[attach_schedule(full, total_steps=TOTAL, hook="lightning").callback]).fit(full)

    first = Net()
    _trainer(max_steps=TOTAL // 2, default_root_dir=tmp_path,
             callbacks=[attach_schedule(first, total_steps=TOTAL, hook="lightning").callback]).fit(first)
    ckpt = next(tmp_path.rglob("*.ckpt"))
    second = Net()
    second_sched = attach_schedule(second, total_steps=3, hook="lightning")  # the checkpoint restores the length
    _trainer(max_steps=TOTAL, enable_checkpointing=False, callbacks=[second_sched.callback]).fit(
        second, ckpt_path=str(ckpt))
    assert first.seen + second.seen == pytest.approx(full.seen)
    assert second_sched.length == TOTAL
