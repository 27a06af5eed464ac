import dataclasses
import os

import pytest
import torch
from conftest import compile_sparsecc
from hypothesis import given
from hypothesis import strategies as st

import sparsecc
from sparsecc.settings import ENV_OPTIONS, RpcSettings, Settings, TuneSettings


def test_defaults_are_frozen(monkeypatch):
    monkeypatch.delenv(ENV_OPTIONS, raising=False)
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


def test_environment_options_are_defaults_under_the_callers(monkeypatch):
    monkeypatch.setenv(ENV_OPTIONS, '{"cost_model": "calibrated", "formats": ["csr"], "min_gain": 1.2}')
    s = Settings.from_options({"min_gain": 1.5})
    assert (s.cost_model, s.formats, s.min_gain) == ("calibrated", ("csr",), 1.5)
    monkeypatch.delenv(ENV_OPTIONS)
    assert Settings.from_options(None).cost_model == "measured"


@pytest.mark.parametrize("make, fragment", [
    (lambda: Settings(min_gain=0), "'min_gain' must be > 0"),
    (lambda: Settings(cost_model="fast"), "'break-even', 'calibrated', 'measured'"),
    (lambda: dataclasses.replace(Settings(), csr_max_density=2.0), "within [0, 1]"),
    (lambda: Settings(formats=["csr", "coo"]), "'coo' is not one of"),
    (lambda: Settings(target="sparc"), "option 'target'"),
    (lambda: Settings(target='{"kind": "cuda"}'), "GPU kernels are not written yet"),
    (lambda: TuneSettings(trials=-1), "'trials' must be an int >= 0"),
    (lambda: RpcSettings(tracker="no-port", key="cpu"), "'tracker' must be 'host:port'"),
])
def test_settings_built_directly_are_checked_too(make, fragment):
    with pytest.raises(sparsecc.OptionError, match="option") as info:
        make()
    assert fragment in str(info.value)


def test_dict_and_list_forms_become_settings_types_however_built():
    s = Settings(tune={"trials": 4, "rpc": {"tracker": "127.0.0.1:9190", "key": "cpu"}}, formats=["csr", "csr", "bsr"])
    assert s.tune == TuneSettings(trials=4, rpc=RpcSettings("127.0.0.1:9190", "cpu")) and s.formats == ("csr", "bsr")
    assert s == Settings.from_options({"tune": {"trials": 4, "rpc": {"tracker": "127.0.0.1:9190", "key": "cpu"}},
                                       "formats": ("csr", "bsr")})


def test_resolved_settings_fix_threads_and_cache_once(tmp_path):
    with pytest.raises(ValueError, match="resolved"):
        Settings().threads  # noqa: B018  (unresolved: no stage may guess the thread count)
    s = Settings().resolved()
    assert s.threads == s.num_threads == torch.get_num_threads()
    assert s.cache_dir == os.environ["SPARSECC_CACHE_DIR"]  # the suite's own cache (conftest.isolated_cache)
    assert s.resolved() == s
    own = Settings(num_threads=1, cache_dir=tmp_path).resolved()
    assert (own.threads, own.cache_dir) == (1, str(tmp_path))


@pytest.mark.parametrize("text, fragment", [
    ('{"cost_modl": "measured"}', "Did you mean 'cost_model'"),
    ('{"cost_model": "fast"}', "'break-even', 'calibrated', 'measured'"),
    ('cost_model=measured', "must be a JSON object"),
    ('["measured"]', "must be a JSON object"),
    ('{"min_gain": -1}', "'min_gain' must be > 0"),
])
def test_bad_environment_options_name_the_variable(monkeypatch, text, fragment):
    monkeypatch.setenv(ENV_OPTIONS, text)
    with pytest.raises(sparsecc.OptionError) as info:
        Settings.from_options(None)
    assert ENV_OPTIONS in str(info.value) and fragment in str(info.value)
    # An option the caller gives is not read from the environment, so its bad value there is not in the way.
    if text.startswith('{"cost_model"'):
        assert Settings.from_options({"cost_model": "break-even"}).cost_model == "break-even"


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
