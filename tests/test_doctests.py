"""The examples in the op layer's docstrings run and print what they show."""

import doctest

import pytest

import dropblock_fx.modules
import dropblock_fx.op.functional
import dropblock_fx.op.gamma
import dropblock_fx.recipe.schema


@pytest.mark.parametrize("module", [dropblock_fx.op.functional, dropblock_fx.op.gamma, dropblock_fx.modules,
                                    dropblock_fx.recipe.schema])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
