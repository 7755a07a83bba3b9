"""Fuzz the recipe loader: whatever comes in, the only exception is RecipeError."""

from __future__ import annotations

import os
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dropblock_fx.recipe import Recipe, RecipeError, load_recipe

# More examples for a soak run: DROPBLOCK_FX_FUZZ_EXAMPLES=5000 pytest tests/test_recipe_fuzz.py
EXAMPLES = int(os.environ.get("DROPBLOCK_FX_FUZZ_EXAMPLES", "150"))
FIELDS = list(Recipe.model_fields) + ["stage", "multiplier", "params", "steps", "epochs", "fraction", "points"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["paper", "none", "linear", "cosine", "conv", "channel", "valid", "layer4", "warmup_hold"]),
)
keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8), st.integers(-3, 5))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=20,
)
recipes = st.dictionaries(keys, values, max_size=8)
fast = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _only_recipe_errors(source):
    try:
        out = load_recipe(source)
    except RecipeError as e:
        str(e)  # the message itself must be printable
        return
    assert isinstance(out, Recipe)
    assert Recipe.from_yaml(out.to_yaml()) == out  # whatever validates also round-trips


@fast
@given(recipes)
def test_random_mappings(data):
    _only_recipe_errors(data)


@fast
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "stages": st.lists(st.one_of(st.integers(-6, 6), st.text(max_size=5),
                                         st.dictionaries(st.sampled_from(FIELDS), values, max_size=3)), max_size=4),
            "block_size": values,
            "drop_prob": st.one_of(st.floats(-1, 2), values),
            "keep_prob": st.one_of(st.floats(-1, 2), values),
            "stage_multiplier": st.one_of(st.sampled_from(["paper", "none", "x"]),
                                          st.dictionaries(st.integers(-5, 5), st.floats(-1, 2), max_size=3)),
            "schedule": st.one_of(values, st.fixed_dictionaries(
                {"name": st.sampled_from(["linear", "cosine", "step", "multistep", "exponential",
                                          "warmup-hold", "piecewise-linear", "constant", "bogus"])},
                optional={"params": st.dictionaries(
                    st.sampled_from(["start", "end", "value", "steps", "milestones", "values", "rate",
                                     "warmup", "points", "x"]), values, max_size=3),
                    "steps": values, "epochs": values, "fraction": values})),
            "input_size": st.lists(st.integers(-2, 300), max_size=5),
            "sites": st.lists(st.sampled_from(["conv", "conv_last", "shortcut", "block", "timm", "x"]), max_size=4),
        },
    )
)
def test_near_valid_mappings(data):
    _only_recipe_errors(data)


@fast
@given(st.text(alphabet=string.printable + "\x00\u00e9\u2028", max_size=200))
def test_random_yaml_text(text):
    try:
        Recipe.from_yaml(text, file="fuzz.yaml")
    except RecipeError:
        pass


@fast
@given(st.one_of(st.text(max_size=300), st.binary(max_size=20), st.integers(), st.floats(), st.lists(st.integers())))
def test_random_names_and_objects(source):
    _only_recipe_errors(source)


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=string.printable, max_size=200))
def test_random_yaml_files(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    p.write_text(text)
    _only_recipe_errors(str(p))
