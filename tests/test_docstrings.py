"""The examples in the public docstrings run and print what they show."""
import doctest

import pytest

import fastnorm._data
import fastnorm._functional
import fastnorm.layers


@pytest.mark.parametrize("module", [fastnorm._functional, fastnorm.layers, fastnorm._data])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
