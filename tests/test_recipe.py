"""Recipes: schema, loading, built-ins, YAML round trip, error messages, stage resolution."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml

import dropblock_fx as dbx
from dropblock_fx.recipe import (
    ModelStage,
    Recipe,
    RecipeError,
    StageSpec,
    list_recipes,
    load_recipe,
    recipe_file,
    resolve_stage,
    resolve_stages,
)

BUILTINS = ["amoebanet-style", "last-two-stages", "paper-resnet50", "ppyolo-neck", "retinanet-coco", "timm-resnet"]
REPO = Path(__file__).resolve().parents[1]


def test_public_names_exported():
    for name in ["load_recipe", "list_recipes", "Recipe", "RecipeError", "register_schedule",
                 "attach_schedule", "DropBlockSchedule", "register_hook", "list_schedules"]:
        assert hasattr(dbx, name) and name in dbx.__all__, name


def test_list_recipes_names_the_six_builtins():
    assert list_recipes() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_round_trips_and_cites_reference(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert load_recipe(recipe.model_dump()) == recipe
    text = recipe_file(name).read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header and any("docs/paper.md" in line for line in header), "header must cite docs/paper.md"
    assert pickle.loads(pickle.dumps(recipe)) == recipe


def test_builtins_are_the_files_of_top_level_recipes_dir():
    files = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert files == BUILTINS
    for name in BUILTINS:
        assert recipe_file(name).resolve() == (REPO / "recipes" / f"{name}.yaml").resolve()


def test_paper_resnet50_is_the_paper_setting():
    r = load_recipe("paper-resnet50")
    assert r.stages == [3, 4] and r.block_size == 7 and r.keep_prob == 0.9 and r.rate == pytest.approx(0.1)
    assert r.sites == ["conv", "conv_last", "shortcut"] and r.mask == "channel" and r.seed_region == "valid"
    assert r.stage_multiplier == "paper"
    assert r.schedule is not None and r.schedule.name == "linear"
    assert (r.schedule.steps, r.schedule.epochs, r.schedule.fraction) == (None, None, None)
    assert r.stage_rate(4, 4) == pytest.approx(0.1)
    assert r.stage_rate(3, 4) == pytest.approx(0.025)


def test_timm_resnet_matches_timm_drop_blocks():
    r = load_recipe("timm-resnet")
    assert r.sites == ["timm"] and r.schedule is None and r.mask == "shared" and r.seed_region == "full"
    s3, s4 = r.stages
    assert (s3.stage, s3.block_size, s3.gamma_scale) == (3, 5, 0.25)
    assert (s4.stage, s4.block_size, s4.gamma_scale) == (4, 3, 1.0)


def test_other_builtins_settings():
    assert load_recipe("last-two-stages").stages == [-2, -1]
    assert load_recipe(None) == load_recipe("last-two-stages")
    amoeba = load_recipe("amoebanet-style")
    assert amoeba.block_size == 11 and amoeba.stages[0].block_fraction == 0.5 and amoeba.input_size == [3, 331, 331]
    retina = load_recipe("retinanet-coco")
    assert retina.stages == [1, 2, 3, 4] and retina.schedule is None and retina.target == "backbone.body"
    neck = load_recipe("ppyolo-neck")
    assert neck.target == "backbone.fpn" and neck.block_size == 3 and neck.schedule is None


def test_load_from_path_dict_recipe(tmp_path):
    r = Recipe(stages=[3, {"stage": 4, "block_size": 5}], drop_prob=0.2, schedule={"name": "cosine"})
    p = tmp_path / "mine.yaml"
    p.write_text(r.to_yaml(header="my recipe"))
    assert p.read_text().startswith("# my recipe\n")
    assert load_recipe(str(p)) == r
    assert load_recipe(p) == r
    assert load_recipe(r) is r
    assert load_recipe({"stages": [3], "keep_prob": 0.8}).rate == pytest.approx(0.2)


def test_yaml_round_trip_keeps_int_stage_keys_and_overrides():
    r = Recipe(
        stages=["layer3", {"stage": -1, "multiplier": 0.5, "sites": ["block"]}],
        stage_multiplier={3: 0.25, "layer4": 1.0},
        schedule={"name": "piecewise_linear", "params": {"points": [[0, 0], [0.3, 1]]}, "fraction": 0.5},
        input_size=[3, 16, 32, 32],
    )
    back = Recipe.from_yaml(r.to_yaml())
    assert back == r
    assert back.stage_multiplier == {3: 0.25, "layer4": 1.0}
    assert back.schedule.name == "piecewise-linear"  # canonical spelling


def test_defaults_and_rates():
    r = Recipe()
    assert r.rate == 0.1 and r.stages == [-2, -1] and r.schedule is None
    assert Recipe(keep_prob=0.75).rate == 0.25
    assert Recipe(stage_multiplier={3: 0.5}).stage_rate(3, 4) == pytest.approx(0.05)
    assert Recipe(drop_prob=0.2).stage_rate(3, 4, StageSpec(stage=3, drop_prob=0.3)) == pytest.approx(0.3)
    assert Recipe(stage_multiplier="paper").stage_rate(2, 4) == pytest.approx(0.1 / 16)


# -- error messages ------------------------------------------------------------------------------

BAD_YAML = """\
name: bad
stages:
  - 3
  - stage: 4
    block_size: 0
sites: [conv, conv_lst]
blok_size: 5
"""


def test_error_names_file_line_key_path_value_and_allowed(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(BAD_YAML)
    with pytest.raises(RecipeError) as ei:
        load_recipe(str(p))
    e = ei.value
    assert e.file == str(p)
    assert e.path == "stages[1].block_size" and e.value == 0 and e.line == 5
    assert e.allowed == ">= 1"
    msg = str(e)
    assert f"{p}:5:" in msg and "stages[1].block_size" in msg and "got 0" in msg
    by_key = {i.key: i for i in e.issues}
    assert by_key["sites[1]"].line == 6 and "conv_last" in by_key["sites[1]"].allowed
    assert by_key["blok_size"].line == 7 and "did you mean 'block_size'" in by_key["blok_size"].reason
    assert "block_size" in by_key["blok_size"].allowed


@pytest.mark.parametrize(
    "data, path, needle",
    [
        ({"drop_prob": 0.1, "keep_prob": 0.9}, "keep_prob", "not both"),
        ({"drop_prob": 1.5}, "drop_prob", "less than or equal"),
        ({"stages": [True]}, "stages[0]", "a stage is an index"),
        ({"stages": [2.5]}, "stages[0]", "a stage is an index"),
        ({"stages": [3, 3]}, "stages[1]", "listed twice"),
        ({"stages": []}, "stages", "at least 1"),
        ({"stages": [{"block_size": 3}]}, "stages[0].stage", "missing"),
        ({"stages": [{"stage": 3, "mask": "pixel"}]}, "stages[0].mask", "'channel'"),
        ({"sites": ["conv", "conv"]}, "sites[1]", "twice"),
        ({"stage_multiplier": "papr"}, "stage_multiplier", "'paper'"),
        ({"stage_multiplier": {3: -1}}, "stage_multiplier[3]", "greater than or equal"),
        ({"input_size": [3, 224]}, "input_size", "at least 3"),
        ({"input_size": [3, 0, 224]}, "input_size[1]", "greater than or equal"),
        ({"gamma_scale": float("nan")}, "gamma_scale", "finite"),
        ({"schedule": {"name": "linearr"}}, "schedule.name", "did you mean 'linear'"),
        ({"schedule": {"name": "cosine", "params": {"strat": 0}}}, "schedule.params.strat", "did you mean 'start'"),
        ({"schedule": {"name": "linear", "params": {"end": 2}}}, "schedule.params.end", "[0, 1]"),
        ({"schedule": {"name": "linear", "steps": 10, "epochs": 2}}, "schedule.epochs", "at most one"),
        ({"schedule": {"name": "linear", "steps": 0}}, "schedule.steps", "greater than or equal"),
        ({"schedule": {"name": "multistep", "params": {"milestones": [0.6, 0.2]}}}, "schedule.params.milestones", "increase"),
        ({"schedule": "linear"}, "schedule", "valid dictionary"),
        ({"nonsense": 1}, "nonsense", "unknown key"),
        ({"stages": [{"stage": 3, "keep_prob": 0.9, "drop_prob": 0.1}]}, "stages[0].keep_prob", "not both"),
        ({"stages": [{"stage": 3, "keep_prob": "high"}]}, "stages[0].keep_prob", "[0, 1]"),
    ],
)
def test_bad_recipe_messages(data, path, needle):
    with pytest.raises(RecipeError) as ei:
        load_recipe(data)
    e = ei.value
    assert e.path == path, str(e)
    assert needle in str(e)
    assert e.file is None


def test_unknown_name_suggests_and_lists_builtins():
    with pytest.raises(RecipeError) as ei:
        load_recipe("paper-resnet5")
    msg = str(ei.value)
    assert "did you mean the built-in 'paper-resnet50'" in msg
    for name in BUILTINS:
        assert name in ei.value.allowed


def test_yaml_syntax_error_has_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("stages: [3, 4\nblock_size: 7\n")
    with pytest.raises(RecipeError) as ei:
        load_recipe(p)
    assert ei.value.file == str(p) and ei.value.line is not None and "not valid YAML" in str(ei.value)


def test_yaml_tab_indentation_gets_a_hint(tmp_path):
    p = tmp_path / "tabs.yaml"
    p.write_text("name: tabs\nstages:\n\t- 3\n")
    with pytest.raises(RecipeError, match="indents with spaces") as ei:
        load_recipe(p)
    assert ei.value.line == 3


def test_unknown_recipe_name_is_one_sentence():
    with pytest.raises(RecipeError) as ei:
        load_recipe("paper-resnet-50")
    assert "'paper-resnet-50' is not a built-in recipe or an existing file (did you mean the built-in " \
           "'paper-resnet50'?)" in str(ei.value)


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)


def test_non_mapping_yaml_and_odd_inputs(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- 3\n- 4\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(p)
    for odd in (42, 3.5, [3, 4], b"paper", object(), "", "x\0y", "a" * 5000):
        with pytest.raises(RecipeError):
            load_recipe(odd)
    with pytest.raises(RecipeError):
        load_recipe(tmp_path)  # a directory
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    assert load_recipe(empty) == Recipe()  # an empty file is the default recipe


def test_recipe_error_is_a_value_error_and_pickles():
    with pytest.raises(ValueError):
        load_recipe({"block_size": 0})
    try:
        load_recipe({"block_size": 0})
    except RecipeError as e:
        back = pickle.loads(pickle.dumps(e))
        assert str(back) == str(e) and back.path == "block_size"


# -- stages against a model's stages -----------------------------------------------------------

RESNET_STAGES = [ModelStage(0, "stem", 2), ModelStage(1, "layer1", 4), ModelStage(2, "layer2", 8),
                 ModelStage(3, "layer3", 16), ModelStage(4, "layer4", 32)]


def test_resolve_stage_forms():
    assert resolve_stage(3, RESNET_STAGES) == 3
    assert resolve_stage(-1, RESNET_STAGES) == 4
    assert resolve_stage(-2, {1: "layer1", 2: "layer2", 3: "layer3", 4: "layer4"}) == 3
    assert resolve_stage("layer2", [(2, "layer2"), (3, "layer3")]) == 2
    assert resolve_stage(StageSpec(stage="layer4"), RESNET_STAGES) == 4
    assert resolve_stage(1, [1, 2]) == 1


def test_resolve_stage_error_lists_model_stages():
    with pytest.raises(RecipeError) as ei:
        resolve_stage(7, RESNET_STAGES, path=("stages", 1), file="r.yaml")
    e = ei.value
    assert e.path == "stages[1]" and e.value == 7 and e.file == "r.yaml"
    for text in ["0 ('stem', stride 2)", "3 ('layer3', stride 16)", "4 ('layer4', stride 32)", "-1 .. -5"]:
        assert text in e.allowed
    with pytest.raises(RecipeError, match="did you mean 'layer4'"):
        resolve_stage("layer5", RESNET_STAGES)
    with pytest.raises(RecipeError) as ei:
        resolve_stage(StageSpec(stage=-9), RESNET_STAGES, path=("stages", 0))
    assert ei.value.path == "stages[0].stage"


def test_resolve_stages_maps_specs_and_rejects_aliases():
    r = Recipe(stages=[3, {"stage": -1, "block_size": 3}])
    out = resolve_stages(r, RESNET_STAGES)
    assert [i for i, _ in out] == [3, 4] and out[0][1] is None and out[1][1].block_size == 3
    with pytest.raises(RecipeError, match="both mean stage 4"):
        resolve_stages(Recipe(stages=[4, -1]), RESNET_STAGES)


def test_built_wheel_ships_the_recipes_without_any_link(tmp_path):
    """The wheel maps top-level recipes/ to dropblock_fx.recipes: no symlink in the source
    tree, so a checkout without symlink support builds the same wheel."""
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    assert not any(p.is_symlink() for p in (REPO / "src").rglob("*"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("dropblock_fx/recipes/") and n.endswith(".yaml")}
    assert shipped == {p.name for p in (REPO / "recipes").glob("*.yaml")}
    assert "dropblock_fx/integrations/timm.py" in names
    import dropblock_fx.recipes  # the package the editable install maps to recipes/

    assert Path(dropblock_fx.recipes.__file__).resolve().parent == (REPO / "recipes").resolve()


def test_docstring_examples_of_recipe_and_schedule_layers():
    import doctest

    import dropblock_fx.recipe.errors
    import dropblock_fx.recipe.loader
    import dropblock_fx.recipe.schema
    import dropblock_fx.recipe.stages
    import dropblock_fx.schedule.core
    import dropblock_fx.schedule.registry

    for module in (dropblock_fx.recipe.errors, dropblock_fx.recipe.loader, dropblock_fx.recipe.schema,
                   dropblock_fx.recipe.stages, dropblock_fx.schedule.core, dropblock_fx.schedule.registry):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, module.__name__


def test_docs_recipe_example_is_a_valid_recipe_of_defaults():
    text = (REPO / "docs" / "recipes.md").read_text()
    example = next(block for block in text.split("```yaml\n")[1:] if "my-recipe" in block).split("```")[0]
    recipe = Recipe.from_yaml(example)
    assert recipe.model_dump(exclude={"name", "description", "schedule"}) == Recipe().model_dump(
        exclude={"name", "description", "schedule"})
    assert recipe.schedule.model_dump(exclude={"params"}) == dbx.ScheduleSpec().model_dump(exclude={"params"})
    assert recipe.schedule.params == {"start": 0.0, "end": 1.0}  # linear's defaults, spelled out


def test_stage_errors_found_after_loading_still_name_file_and_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: r\nstages:\n  - 3\n  - stage: 7\n    block_size: 3\n")
    recipe = load_recipe(p)
    with pytest.raises(RecipeError) as ei:
        resolve_stages(recipe, RESNET_STAGES)
    e = ei.value
    assert (e.file, e.line, e.path, e.value) == (str(p), 4, "stages[1].stage", 7)
    assert str(e).startswith(f"{p}:4: ")
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe  # the remembered source changes nothing
    with pytest.raises(RecipeError) as ei:
        resolve_stages(Recipe(stages=[7]), RESNET_STAGES)
    assert ei.value.file is None and ei.value.line is None


def test_tuple_params_round_trip():
    r = Recipe(schedule={"name": "multistep", "params": {"milestones": (0.5,), "values": (0.0, 1.0)}})
    assert r.schedule.params == {"milestones": [0.5], "values": [0.0, 1.0]}
    assert Recipe.from_yaml(r.to_yaml()) == r


def test_stage_keep_prob_is_stored_as_drop_prob():
    r = Recipe(stages=[{"stage": 3, "keep_prob": 0.9}, 4])
    assert r.stages[0].drop_prob == 0.1
    assert r.stage_rate(3, 4, r.stages[0]) == 0.1
    assert Recipe.from_yaml(r.to_yaml()) == r


def test_json_schema_for_editors_and_the_cli():
    schema = Recipe.model_json_schema()
    assert {"stages", "sites", "block_size", "keep_prob", "schedule"} <= set(schema["properties"])
