"""The dropblock-fx command: every command, --help with examples, one-line errors, the quick demo."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from dropblock_fx.cli import main
from dropblock_fx.cli.commands import parse_input_size, parse_overrides
from dropblock_fx.recipe import list_recipes

COMMANDS = ["plan", "recipes", "validate", "masks", "schedule", "demo"]


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_commands_and_every_command_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "examples:" in out
    for c in COMMANDS:
        assert c in out
        with pytest.raises(SystemExit):
            main([c, "--help"])
        sub = capsys.readouterr().out
        assert "examples:" in sub and f"dropblock-fx {c}" in sub, c
    assert main([]) == 2


HEAVY = ("torch", "timm", "torchvision", "numpy", "matplotlib")


@pytest.mark.parametrize("argv", [["recipes"], ["recipes", "paper-resnet50"], ["--help"], ["-V"],
                                  ["plan", "--help"]])
def test_quick_commands_import_no_torch(argv):
    """`recipes`, `--help` and `-V` start fast: the console entry point imports no torch (nor
    timm, numpy, matplotlib); read from -X importtime, which lists every module imported."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "dropblock_fx", *argv],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout, r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "dropblock_fx.cli.main" in imported  # the listing is complete
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert not heavy, heavy[:10]


def test_public_names_load_on_first_use():
    """The package root imports no torch, and every public name still resolves, by attribute,
    by from-import and by star-import, to the object its module defines; dir() lists them."""
    code = textwrap.dedent("""\
        import importlib, sys
        import dropblock_fx as dbx
        assert "torch" not in sys.modules
        assert set(dbx.__all__) <= set(dir(dbx)) and len(dbx.__all__) == len(set(dbx.__all__)) == 33
        ns = {}
        exec("from dropblock_fx import *", ns)
        for name in dbx.__all__:
            owner = importlib.import_module(dbx._SOURCES[name], "dropblock_fx")
            assert getattr(dbx, name) is getattr(owner, name) is ns[name], name
        from dropblock_fx import apply_dropblock, plan
        assert callable(plan) and plan.__module__ == "dropblock_fx.surgery.plan"
        try:
            dbx.no_such_name
        except AttributeError as e:
            assert "no_such_name" in str(e)
        else:
            raise AssertionError("no AttributeError")
        print("ok")
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_version(capsys):
    from dropblock_fx import __version__

    for flag in ("-V", "--version"):
        with pytest.raises(SystemExit) as e:
            main([flag])
        assert e.value.code == 0 and capsys.readouterr().out.strip() == f"dropblock-fx {__version__}"


@pytest.mark.parametrize("module", ["dropblock_fx", "dropblock_fx.cli"])
def test_console_script_module_entry(module):
    r = subprocess.run([sys.executable, "-m", module, "recipes"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "paper-resnet50" in r.stdout


def test_recipes_lists_builtins_and_prints_one(capsys):
    code, out, _ = run(capsys, "recipes")
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list_recipes()
    code, out, _ = run(capsys, "recipes", "paper-resnet50")
    assert code == 0 and "keep_prob: 0.9" in out
    code, out, _ = run(capsys, "recipes", "--json")
    assert {r["name"] for r in json.loads(out)} == set(list_recipes())


def test_validate_ok_and_errors_with_line_and_key_path(capsys, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("stages: [3, 4]\nblock_size: 5\nkeep_prob: 0.9\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        name: bad
        stages:
          - 3
          - {stage: 4, block_size: 0}
        sites: [conv, shortcutt]
        """))
    code, out, _ = run(capsys, "validate", str(good))
    assert code == 0 and "OK" in out
    code, out, _ = run(capsys, "validate", str(good), str(bad))
    assert code == 1
    assert f"{bad}:4: stages[1].block_size:" in out
    assert f"{bad}:5: sites[1]:" in out and "shortcut" in out
    code, out, _ = run(capsys, "validate", str(good), "--model", "resnet10t")
    assert code == 0 and "modules" in out
    far = tmp_path / "far.yaml"
    far.write_text("stages: [7]\n")
    code, out, _ = run(capsys, "validate", str(far), "--model", "resnet10t")
    assert code == 1 and "no stage 7" in out


def test_plan_table_json_and_model_specs(capsys, tmp_path, monkeypatch):
    code, out, _ = run(capsys, "plan", "resnet10t", "--recipe", "paper-resnet50", "--input-size", "64")
    assert code == 0
    for word in ("stage", "output stride", "feature map", "DropBlock modules", "block", "drop rate",
                 "real rate", "layer3", "layer4"):
        assert word in out
    # every site kind shown is explained in the legend under the table
    legend = " ".join(out.split("\nsites: ")[1].split("\ndrop rate: ")[0].split())
    assert all(f"{k} = " in legend for k in ("conv", "conv_last", "shortcut"))
    code, out, _ = run(capsys, "plan", "resnet10t", "--input-size", "3x64x64", "--json", "--set", "block_size=3")
    data = json.loads(out)
    assert code == 0 and data["input_shape"] == [1, 3, 64, 64] and data["recipe"]["block_size"] == 3
    assert {s["stage"] for s in data["summary"]} == {3, 4}
    assert all({"path", "kind", "block_size", "target_drop_prob", "expected_drop_prob"} <= set(r) for r in data["rows"])
    code, out, _ = run(capsys, "plan", "torchvision:resnet18", "--input-size", "64", "64", "--modules")
    assert code == 0 and "layer4.1.dropblock" in out
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""\
        import torch.nn as nn
        def small():
            return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        """))
    code, out, _ = run(capsys, "plan", f"{tmp_path / 'mynets.py'}:small", "--input-size", "32")
    assert code == 0 and "DropBlock modules" in out
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = run(capsys, "plan", "mynets:small", "--input-size", "32", "--json")
    assert code == 0 and json.loads(out)["model"] == "mynets:small"


@pytest.mark.parametrize("argv,message", [
    (["plan", "resnet5O"], "did you mean 'resnet50'"),
    (["plan", "torchvision:resnet5"], "did you mean 'resnet50'"),
    (["plan", "resnet10t", "--recipe", "nope"], "is not a built-in recipe or an existing file"),
    (["plan", "resnet10t", "--set", "block_size=0"], "block_size"),
    (["plan", "resnet10t", "--set", "block_size"], "KEY=VALUE"),
    (["plan", "resnet10t", "--input-size", "a"], "--input-size"),
    (["plan", "no_such_pkg.mod:f"], "cannot import"),
    (["masks", "--image", "/no/such.png"], "/no/such.png"),
    (["schedule", "paper-resnet50", "--steps", "0"], "--steps"),
])
def test_errors_are_one_line_without_traceback(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err
    assert err.startswith(f"dropblock-fx {argv[0]}: error: ")


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError):
        main(["--debug", "plan", "resnet5O"])
    with pytest.raises(ValueError):
        main(["plan", "resnet5O", "--debug"])


def test_schedule_prints_and_plots_each_stage(capsys, tmp_path, monkeypatch):
    png = tmp_path / "s.png"
    code, out, _ = run(capsys, "schedule", "paper-resnet50", "--steps", "100", "--points", "3", "--out", str(png))
    assert code == 0 and png.stat().st_size > 1000
    lines = out.splitlines()
    assert "stage 3" in lines[1] and "stage 4" in lines[1]
    first, last = lines[3].split(), lines[-2].split()  # step 0 and step 100
    assert first[0] == "0" and float(first[2]) == 0.0 and float(first[3]) == 0.0
    assert last[0] == "100" and float(last[2]) == pytest.approx(0.025) and float(last[3]) == pytest.approx(0.1)
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "schedule", "paper-resnet50", "--steps", "10")  # plots by default
    assert code == 0 and (tmp_path / "dropblock_schedule.png").is_file() and "wrote" in out
    code, out, _ = run(capsys, "schedule", "paper-resnet50", "--steps", "10", "--no-plot")
    assert code == 0 and "wrote" not in out
    code, out, _ = run(capsys, "schedule", "timm-resnet", "--steps", "10", "--json")
    data = json.loads(out)
    assert data["constant"] and all(r["factor"] == 1.0 for r in data["rows"])
    code, out, _ = run(capsys, "schedule", "last-two-stages", "--steps", "10", "--model", "resnet10t", "--json")
    assert json.loads(out)["stages"] == ["3 layer3", "4 layer4"]


def test_masks_writes_png_for_sample_and_user_image(capsys, tmp_path):
    from PIL import Image

    png = tmp_path / "m.png"
    code, out, _ = run(capsys, "masks", "--out", str(png), "--block-sizes", "3", "5", "--channels", "2")
    assert code == 0 and png.stat().st_size > 10_000 and "dropout" in out and "DropBlock 5x5" in out
    img = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(img)
    code, out, _ = run(capsys, "masks", "--image", str(img), "--out", str(png), "--size", "14", "--block-sizes", "7")
    assert code == 0 and "in.png" in out
    code, _, err = run(capsys, "masks", "--size", "5", "--block-sizes", "7")
    assert code == 1 and "block-sizes" in err


def test_masks_match_the_methods():
    from dropblock_fx.cli.masks import method_masks

    masks = method_masks(14, 64, 0.2, [5], seed=0)
    (t1, drop, _), (t2, spatial, _), (t3, block, exp) = masks
    assert (t1, t2, t3) == ("dropout", "SpatialDropout", "DropBlock 5x5")
    per_channel = spatial.reshape(64, -1)
    assert set(per_channel.min(1)) <= {0.0, 1.0} and (per_channel.min(1) == per_channel.max(1)).all()
    assert 0.1 < 1 - drop.mean() < 0.3 and abs((1 - block.mean()) - exp) < 0.08


def test_parsers():
    assert parse_input_size(["224"], 3) == [3, 224, 224]
    assert parse_input_size(["1x32x48"], 3) == [1, 32, 48]
    assert parse_input_size(["32", "48"], 1) == [1, 32, 48]
    assert parse_overrides(["stages=[3, 4]", "drop_prob=0.2", "target=backbone.body"]) == \
        {"stages": [3, 4], "drop_prob": 0.2, "target": "backbone.body"}


def test_demo_quick_trains_the_three_arms_and_probes_the_mechanism(capsys, tmp_path):
    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    code, out, err = run(capsys, "demo", "--quick", "--out", str(png), "--json", str(js))
    assert code == 0 and png.stat().st_size > 10_000
    for text in ("no regularizer", "DropBlock (block 3)", "dropout (same sites)", "val loss", "val - train loss",
                 "the mechanism", "layer2 map", "layer3 output", "logits change, DropBlock 5x5 / dropout"):
        assert text in out, text
    assert "[3/3] dropout (same sites), seed 0" in err  # one line per finished run
    data = json.loads(js.read_text())
    base, db, dropout = data["runs"]
    assert base["modules"] == 0 and db["modules"] == dropout["modules"] > 0
    assert all(v == 0 for _, v in base["drop"]) and db["drop"][-1][1] > 0
    assert [s for s, _ in db["drop"]] == [s for s, _ in base["drop"]]
    assert db["drop"] == dropout["drop"]  # same rates and schedule: only the block size differs
    assert set(db["stage_drop"]) == {"stage 2 (layer2)", "stage 3 (layer3)"} and not base["stage_drop"]
    assert [len(r["val_loss"]) for r in data["runs"]] == [1, 1, 1]
    assert base["gap"] == [base["val_loss"][0] - base["train_loss"][0]]
    mech = data["mechanism"]
    assert mech["stage"] == "layer2" and mech["next_stage"] == "layer3" and mech["resolution"] == [8, 8]
    assert mech["methods"] == ["dropout", "DropBlock 3x3", "DropBlock 5x5"]
    for m in mech["methods"]:  # one value per batch (64 validation images: batches of 60 and 4)
        assert all(len(v) == 2 for v in mech["values"][m]["logits"])


def test_mechanism_drops_the_asked_fraction_and_changes_nothing_at_zero():
    import torch

    from dropblock_fx import plan
    from dropblock_fx.cli.demo.mechanism import probe
    from dropblock_fx.cli.demo.train import build_model

    torch.manual_seed(0)
    model = build_model("resnet10t", 10, 1, 8)
    p = plan(model, input_size=(1, 64, 64))
    x = torch.randn(8, 1, 64, 64)
    res = probe(model, p, x, stage=2, rates=[0.0, 0.2], blocks=(3,), batch=4)
    assert res.resolution == (8, 8) and res.methods == ["dropout", "DropBlock 3x3"]
    for m in res.methods:
        v = res.values[m]
        assert v["next"][0] == [0.0, 0.0] and v["logits"][0] == [0.0, 0.0]  # p = 0: nothing dropped
        assert all(0.3 < c < 0.7 for c in v["map"][1])  # about sqrt(p / (1 - p)) = 0.5 at p = 0.2
        assert all(c > 0 for c in v["logits"][1])
    assert not model._forward_hooks and not model.layer2._forward_hooks and not model.layer3._forward_hooks


def test_demo_runs_are_the_same_in_worker_processes(capsys, tmp_path):
    """--jobs 2 runs the arms in spawned workers; every run seeds itself, so the numbers (and the
    mechanism, measured on the weights a worker trained) are those of the runs in this process."""
    small = ["demo", "--epochs", "1", "--width", "8", "--batch-size", "32", "--seeds", "1", "--train-per-class", "3",
             "--no-dropout-arm", "--no-plot", "--no-progress"]
    docs = []
    for jobs in ("1", "2"):
        js = tmp_path / f"jobs{jobs}.json"
        code, out, _ = run(capsys, *small, "--jobs", jobs, "--json", str(js))
        assert code == 0 and f"2 runs in {jobs} process" in out
        docs.append(json.loads(js.read_text()))
    for doc in docs:
        for r in doc["runs"]:
            r.pop("seconds")
    assert docs[0]["runs"] == docs[1]["runs"] and docs[0]["mechanism"] == docs[1]["mechanism"]
    assert [r["label"] for r in docs[1]["runs"]] == ["no regularizer", "DropBlock (block 3)"]


def test_demo_seeds_and_arms(capsys, tmp_path):
    js = tmp_path / "demo.json"
    code, out, _ = run(capsys, "demo", "--quick", "--no-plot", "--no-progress", "--no-dropout-arm",
                       "--json", str(js))
    runs = json.loads(js.read_text())["runs"]
    assert code == 0 and [r["label"] for r in runs] == ["no regularizer", "DropBlock (block 3)"]
    assert "over 1 seed(s)" in out and "lower in" in out


def test_demo_constant_recipe_keeps_a_constant_rate(capsys, tmp_path):
    js = tmp_path / "demo.json"
    code, _, _ = run(capsys, "demo", "--quick", "--recipe", "timm-resnet", "--set", "input_size=[1, 64, 64]",
                     "--no-plot", "--no-progress", "--json", str(js))
    rates = {v for _, v in json.loads(js.read_text())["runs"][1]["drop"]}
    assert code == 0 and rates == {0.1}


def test_demo_on_an_image_folder(capsys, tmp_path):
    from PIL import Image

    for c, color in (("red", (220, 20, 20)), ("blue", (20, 20, 220))):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (20, 20), tuple(min(255, v + 5 * i) for v in color)).save(tmp_path / "data" / c / f"{i}.png")
    code, out, _ = run(capsys, "demo", "--quick", "--data", str(tmp_path / "data"), "--no-plot", "--no-progress")
    assert code == 0 and "2 classes" in out and "64x64x3" in out
    code, _, err = run(capsys, "demo", "--quick", "--data", str(tmp_path / "missing"))
    assert code == 1 and "missing" in err


def test_plan_shows_each_stage_modules_and_the_dilation_that_stands_for_its_stride(capsys):
    code, out, _ = run(capsys, "plan", "torchvision:deeplabv3_resnet50", "--target", "backbone",
                       "--recipe", "paper-resnet50", "--input-size", "64")
    assert code == 0
    lines: dict[str, str] = {}  # the stage table comes first, then the per-stage summary
    for line in out.splitlines():
        if line[:1].isdigit():
            lines.setdefault(" ".join(line.split()[:2]), line)
    assert "16 = 8 x dilation 2" in lines["3 layer3"] and lines["3 layer3"].rstrip().endswith("layer3")
    assert "32 = 8 x dilation 4" in lines["4 layer4"]
    assert lines["1 maxpool..layer1"].rstrip().endswith("maxpool..layer1")
    code, out, _ = run(capsys, "plan", "torchvision:deeplabv3_resnet50", "--target", "backbone",
                       "--recipe", "paper-resnet50", "--input-size", "64", "--json")
    data = json.loads(out)
    assert [(s["index"], s["stride"], s["dilation"]) for s in data["stages"]][3:] == [(3, 16, 2), (4, 32, 4)]
    assert data["stages"][4]["modules"] == ["layer4"] and len(data["rows"]) == 36


def test_plan_png_draws_the_stages_and_their_sites(capsys, tmp_path):
    from PIL import Image

    from dropblock_fx import plan
    from dropblock_fx.cli.models import load_model
    from dropblock_fx.cli.plan_picture import stage_channels

    png = tmp_path / "plan.png"
    code, out, _ = run(capsys, "plan", "resnet10t", "--input-size", "64", "--set", "block_size=3", "--png", str(png))
    assert code == 0 and f"wrote {png}" in out
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 600 and img.height > 300
        colors = img.convert("RGB").getcolors(1 << 20)
    # one square per module, coloured by site kind: conv (tab:blue), conv_last (tab:orange), shortcut (tab:green)
    present = {c for _, c in colors}
    assert {(31, 119, 180), (255, 127, 14), (44, 160, 44)} <= present
    model = load_model("resnet10t")
    p = plan(model, input_size=(3, 64, 64))
    assert stage_channels(p, model) == {0: 64, 1: 64, 2: 128, 3: 256, 4: 512}
    code, out, _ = run(capsys, "plan", "resnet10t", "--input-size", "64", "--json", "--png", str(png))
    assert code == 0 and json.loads(out)["model"] == "resnet10t"  # stdout stays JSON


def test_plan_png_without_matplotlib_names_the_extra(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ModuleNotFoundError
    code, out, err = run(capsys, "plan", "resnet10t", "--input-size", "64", "--png", str(tmp_path / "p.png"))
    assert code == 1 and "stage" in out and not (tmp_path / "p.png").exists()
    assert 'pip install -e ".[demo]"' in err and err.count("pip install") == 1, err


def test_plan_explain_lists_what_holds_no_feature_map(capsys):
    """MobileViT's transformer blocks run 1x1 convs and residual adds on unfolded patches
    (B, C, patch_area, n_patches): left out, and said why."""
    assert main(["plan", "timm:mobilevitv2_050", "--input-size", "256", "--explain"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("left out: ")]
    assert lines and all("no stage map" in ln or "side branch" in ln or "batch dim" in ln for ln in lines), lines
    assert any("stages.3.1: add" in ln and "4x64 is no stage map" in ln for ln in lines), lines
    assert main(["plan", "timm:mobilevitv2_050", "--input-size", "256", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"position", "why"} == set(doc["left_out"][0]) and len(doc["left_out"]) == len(lines)
