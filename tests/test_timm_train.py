"""The recipe's schedule in timm's train.py: a loop composed from timm's own pieces the way
train.py composes them (create_model by name with model kwargs, create_optimizer_v2,
create_scheduler_v2, train()/eval() per epoch, CheckpointSaver, resume_checkpoint) follows the
schedule at every step, across a resume in the middle of the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dropblock_fx.timm  # noqa: F401  (the one line train.py gets)
from dropblock_fx import DropBlockNd
from dropblock_fx.integrations import timm_train

timm = pytest.importorskip("timm")
from timm.models import create_model, resume_checkpoint  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402
from timm.scheduler import create_scheduler_v2  # noqa: E402
from timm.utils import CheckpointSaver  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[1] / "src"
BATCHES = 3  # optimizer updates per epoch
MODEL_KWARGS = {"recipe": "last-two-stages", "recipe_overrides": {"input_size": [3, 32, 32], "block_size": 3}}


def _data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 3, (2,), generator=g)) for _ in range(BATCHES)]


def run(out: Path, *, epochs: int = 4, resume: str = "", stop_after: int | None = None, opt: str = "sgd",
        on_updates: bool = False, model_kwargs=MODEL_KWARGS):
    """One train.py run; returns (updates done, module rates) at every training forward."""
    torch.manual_seed(0)
    model = create_model("resnet10t_dropblock", pretrained=False, num_classes=3, **model_kwargs)
    drops = {n: m for n, m in model.named_modules() if isinstance(m, DropBlockNd)}
    seen: list[tuple[int, dict[str, float]]] = []
    updates = [0]
    model.register_forward_pre_hook(
        lambda mod, args: seen.append((updates[0], {n: m.drop_prob for n, m in drops.items()})) if mod.training else None
    )
    out.mkdir(parents=True, exist_ok=True)
    optimizer = create_optimizer_v2(model, opt=opt, lr=0.01, weight_decay=0.0)
    resume_epoch = resume_checkpoint(model, resume, optimizer=optimizer, log_info=False) if resume else None
    saver = CheckpointSaver(model=model, optimizer=optimizer, checkpoint_dir=str(out), recovery_dir=str(out),
                            max_history=2)
    loader = _data()
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=epochs, warmup_epochs=1, cooldown_epochs=1,
        step_on_epochs=not on_updates, updates_per_epoch=len(loader),
    )
    start_epoch = resume_epoch or 0
    if start_epoch > 0:
        if on_updates:
            lr_scheduler.step_update(start_epoch * len(loader))
        else:
            lr_scheduler.step(start_epoch)
    updates[0] = start_epoch * len(loader)
    for epoch in range(start_epoch, num_epochs):
        model.train()
        num_updates = epoch * len(loader)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            num_updates += 1
            updates[0] = num_updates
            lr_scheduler.step_update(num_updates=num_updates)
        lr_scheduler.step(epoch + 1)
        model.eval()
        with torch.no_grad():
            model(loader[0][0])
        saver.save_checkpoint(epoch, metric=loss.item())
        if stop_after is not None and epoch == stop_after:
            break
    return seen, model, num_epochs


def expected(model, done: int, total: int) -> dict[str, float]:
    return {n: m.target_drop_prob * done / total for n, m in model.named_modules() if isinstance(m, DropBlockNd)}


def check_rates(seen, model, total):
    assert seen, "no training forward ran"
    for done, rates in seen:
        want = expected(model, done, total)
        assert rates == pytest.approx(want, abs=1e-12), f"after {done} updates"


@pytest.mark.parametrize("opt,on_updates", [("sgd", False), ("adamw", True)])
def test_schedule_follows_the_run_and_a_resume(tmp_path, opt, on_updates):
    seen, model, num_epochs = run(tmp_path / "full", opt=opt, on_updates=on_updates)
    total = num_epochs * BATCHES
    assert num_epochs == 5  # epochs + cooldown: the schedule spans the whole run
    check_rates(seen, model, total)
    assert [d for d, _ in seen] == list(range(total))
    targets = {n: m.target_drop_prob for n, m in model.named_modules() if isinstance(m, DropBlockNd)}
    assert targets and all(seen[-1][1][n] >= 0.9 * t > 0 for n, t in targets.items())  # near the target at the end

    first, _, _ = run(tmp_path / "a", opt=opt, on_updates=on_updates, stop_after=1)
    second, model2, _ = run(tmp_path / "b", opt=opt, on_updates=on_updates,
                            resume=str(tmp_path / "a" / "last.pth.tar"))
    assert [d for d, _ in first + second] == list(range(total))
    check_rates(second, model2, total)
    for (_, resumed), (_, straight) in zip(first + second, seen):
        assert resumed == pytest.approx(straight, abs=1e-12)


def test_schedule_length_from_model_kwargs(tmp_path):
    kwargs = dict(MODEL_KWARGS, recipe_overrides=dict(MODEL_KWARGS["recipe_overrides"],
                                                      schedule={"name": "linear", "epochs": 2}))
    seen, model, _ = run(tmp_path, epochs=3, model_kwargs=kwargs)
    check_rates([(d, r) for d, r in seen if d <= 2 * BATCHES], model, 2 * BATCHES)
    target = expected(model, 1, 1)
    assert all(r == pytest.approx(target) for d, r in seen if d >= 2 * BATCHES)  # then holds


def test_hand_attached_schedule_wins_and_unwatched_models_are_left_alone(tmp_path):
    model = create_model("resnet10t_dropblock", num_classes=3, **MODEL_KWARGS)
    assert model in timm_train.watched()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mine = dropblock_fx.attach_schedule(model, total_steps=7, optimizer=opt)
    lr_scheduler, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=2, updates_per_epoch=3)
    assert dropblock_fx.schedule_of(model) is mine
    lr_scheduler.step(1)
    assert mine.count == 0
    # a model without a scheduled recipe is not watched
    plain = create_model("resnet10t_dropblock", num_classes=3, recipe="timm-resnet")
    assert plain not in timm_train.watched()


def test_install_rebinds_a_script_that_imported_the_factory_first(monkeypatch):
    original = timm_train._ORIGINAL["create_scheduler_v2"]
    script = types.ModuleType("__main__")
    script.create_scheduler_v2 = original
    monkeypatch.setitem(sys.modules, "__main__", script)
    timm_train.install()
    assert script.create_scheduler_v2 is timm.scheduler.create_scheduler_v2
    assert script.create_scheduler_v2.__dropblock_fx__ and script.create_scheduler_v2 is not original


SCRIPT = """
    import json, sys
    import torch, torch.nn.functional as F
    from timm.models import create_model        # no dropblock_fx import: the launcher does it
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    model = create_model(sys.argv[1], num_classes=3, recipe_overrides={"input_size": [3, 32, 32], "block_size": 3})
    drop = next(m for m in model.modules() if type(m).__name__ == "DropBlock2d")
    opt = create_optimizer_v2(model, opt="sgd", lr=0.01)
    sched, epochs = create_scheduler_v2(opt, sched="step", num_epochs=2, updates_per_epoch=2)
    rates = []
    for epoch in range(epochs):
        model.train()
        for i in range(2):
            rates.append(drop.drop_prob / drop.target_drop_prob)
            F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
            opt.step(); opt.zero_grad()
        sched.step(epoch + 1)
    print(json.dumps(rates))
"""


def test_launcher_runs_a_script_with_the_schedule(tmp_path):
    """``dropblock-fx timm-train`` in a fresh process, as torchrun starts it (``-m``)."""
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "dropblock_fx.cli", "timm-train", str(script), "resnet10t_dropblock"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == pytest.approx([0, 0.25, 0.5, 0.75])


def test_launcher_usage_and_the_older_spelling(tmp_path, monkeypatch, capsys):
    import runpy

    from dropblock_fx.cli import main

    with pytest.raises(SystemExit):
        main(["timm-train"])  # no script: usage
    assert main(["timm-train", str(tmp_path / "missing.py")]) == 1
    assert "no such script" in capsys.readouterr().err
    script = tmp_path / "train.py"
    script.write_text("import sys, timm\nprint('args', sys.argv[1:], timm.is_model('resnet10t_dropblock'))\n")
    monkeypatch.setattr(sys, "argv", ["dropblock_fx.timm_train", str(script), "--epochs", "3"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "dropblock_fx.timm_train", raising=False)  # run afresh, as -m does
    with pytest.raises(SystemExit) as done:  # python -m dropblock_fx.timm_train train.py ...
        runpy.run_module("dropblock_fx.timm_train", run_name="__main__")
    assert done.value.code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "args ['--epochs', '3'] True"


def test_unscheduled_warning_in_timm_train_script_names_the_fix(monkeypatch):
    from dropblock_fx.schedule import pending

    script = types.ModuleType("__main__")
    script.__file__ = "/somewhere/pytorch-image-models/train.py"
    monkeypatch.setitem(sys.modules, "__main__", script)
    assert pending.detect_loop() == "timm"
    assert "dropblock-fx timm-train train.py" in pending.unscheduled_message("timm")
    model = create_model("resnet10t_dropblock", num_classes=3, **MODEL_KWARGS).train()
    with pytest.warns(UserWarning, match="import dropblock_fx.timm"):
        model(torch.randn(2, 3, 32, 32))


def test_followed_lr_scheduler_keeps_its_state_and_pickles():
    import pickle

    from timm.scheduler import CosineLRScheduler

    model = create_model("resnet10t_dropblock", num_classes=3, **MODEL_KWARGS)
    opt = create_optimizer_v2(model, opt="sgd", lr=0.01)
    plain_opt = create_optimizer_v2(create_model("resnet10t", num_classes=3), opt="sgd", lr=0.01)
    lr_scheduler, _ = create_scheduler_v2(opt, sched="cosine", num_epochs=2, updates_per_epoch=3)
    plain, _ = create_scheduler_v2(plain_opt, sched="cosine", num_epochs=2, updates_per_epoch=3)
    assert isinstance(lr_scheduler, CosineLRScheduler) and type(plain) is CosineLRScheduler
    assert set(lr_scheduler.state_dict()) == set(plain.state_dict())
    lr_scheduler.step(1)
    assert dropblock_fx.schedule_of(model).count == 3
    clone = pickle.loads(pickle.dumps(lr_scheduler))
    assert type(clone) is CosineLRScheduler and clone.state_dict().keys() == lr_scheduler.state_dict().keys()
