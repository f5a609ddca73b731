"""The `dnas` command sets its measured XLA:CPU flags before JAX starts (dnas.xla_flags)."""
import pytest
from tiny_bench import BASE_XLA_FLAGS, with_defaults, without_defaults

from dnas import xla_flags
from dnas.xla_flags import apply_cpu_defaults, defaults_apply, with_cpu_defaults


def test_defaults_are_appended_and_the_users_choice_kept(monkeypatch):
    monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10))
    assert with_cpu_defaults("") == "--xla_cpu_use_fusion_emitters=false"
    assert with_cpu_defaults("--xla_force_host_platform_device_count=8") == \
        "--xla_force_host_platform_device_count=8 --xla_cpu_use_fusion_emitters=false"
    assert with_cpu_defaults(" --xla_cpu_use_fusion_emitters=true ") == "--xla_cpu_use_fusion_emitters=true"
    env = {"DNAS_XLA_DEFAULTS": "0", "XLA_FLAGS": "--xla_dump_to=x"}
    assert apply_cpu_defaults(env) == "--xla_dump_to=x" and env["XLA_FLAGS"] == "--xla_dump_to=x"
    env = {}
    assert apply_cpu_defaults(env) == env["XLA_FLAGS"] == "--xla_cpu_use_fusion_emitters=false"


def test_no_defaults_for_a_jaxlib_that_dropped_the_flag(monkeypatch):
    """XLA aborts on a flag it does not know: jaxlib 0.11.2 no longer has the fusion-emitter
    flag, so from 0.11 (and when jaxlib's version cannot be read) XLA_FLAGS is left alone."""
    assert defaults_apply((0, 10)) and defaults_apply((0, 9)) and not defaults_apply((0, 11))
    assert not defaults_apply((1, 0))
    for version in ((0, 11), None):
        monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda v=version: v)
        env = {"XLA_FLAGS": "--xla_dump_to=x"}
        assert apply_cpu_defaults(env) == "--xla_dump_to=x" and env == {"XLA_FLAGS": "--xla_dump_to=x"}
        env = {}
        assert apply_cpu_defaults(env) == "" and "XLA_FLAGS" not in env


@pytest.mark.skipif(not defaults_apply(), reason="the installed jaxlib does not take dnas's XLA:CPU flag")
@pytest.mark.xdist_group("tiny_bench")  # with --dist loadgroup, one worker runs both tiny_bench commands once
@pytest.mark.slow  # two `dnas` commands (~30 s on 2 cores); the flag logic itself is tested above
def test_dnas_command_compiles_with_the_flag_and_computes_the_same_step():
    """The flag reaches XLA (a mistyped or removed flag would abort the process) and changes
    only how fusions are emitted: the step's loss equals the one compiled without it."""
    with_flag, without = with_defaults(), without_defaults()
    assert with_flag["xla_flags"] == BASE_XLA_FLAGS + " --xla_cpu_use_fusion_emitters=false"
    assert without["xla_flags"] == BASE_XLA_FLAGS
    assert abs(with_flag["final_train_loss"] - without["final_train_loss"]) < 1e-5
