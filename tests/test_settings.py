import pytest
import torch
from conftest import compile_sparsecc
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc.settings import Settings


def test_defaults_are_frozen():
    s = Settings.from_options(None)
    with pytest.raises(Exception):
        s.csr_max_density = 0.5  # type: ignore[misc]
    assert s == Settings()


def test_unknown_option_names_it_and_suggests():
    with pytest.raises(sparsecc.OptionError) as info:
        Settings.from_options({"csr_max_densty": 0.5})
    msg = str(info.value)
    assert "'csr_max_densty'" in msg and "Did you mean 'csr_max_density'" in msg and "on_failure" in msg


@pytest.mark.parametrize("options, fragment", [
    ({"on_failure": "ignore"}, "'fallback', 'raise'"),
    ({"verify": "yes"}, "must be bool"),
    ({"min_weight_numel": 1.5}, "must be int"),
    ({"num_threads": "two"}, "must be int or None"),
    ({"stop_after": "codegen"}, "'capture', 'analysis'"),
    ({"csr_max_density": 1.5}, "within [0, 1]"),
])
def test_ill_typed_option_lists_valid_choices(options, fragment):
    with pytest.raises(sparsecc.OptionError) as info:
        Settings.from_options(options)
    assert fragment in str(info.value) and list(options)[0] in str(info.value)


@given(st.floats(min_value=0.0, max_value=1.0, allow_nan=False))
def test_any_density_in_range_is_accepted(value):
    assert Settings.from_options({"csr_max_density": value}).csr_max_density == value


def test_bad_option_through_torch_compile_reaches_the_user():
    compiled = compile_sparsecc(torch.nn.Linear(4, 4), offlaod="all")
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4))
    # dynamo wraps backend errors in BackendCompilerFailed; ours is the inner exception and in the message.
    inner = getattr(info.value, "inner_exception", info.value)
    assert isinstance(inner, sparsecc.OptionError) and "Did you mean 'offload'" in str(info.value)


def test_sparsecc_compile_checks_options_at_once():
    with pytest.raises(sparsecc.OptionError):
        sparsecc.compile(torch.nn.Linear(4, 4), options={"verfy": False})
