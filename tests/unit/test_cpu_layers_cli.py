"""`--cpu-layers` on bench / run / serve: a bad value is one line naming the option, before any model is loaded;
good values reach LoadOptions.extra."""

import pytest
from _cli_models import invoke


@pytest.mark.parametrize("command", [["bench", "nosuch"], ["run", "nosuch", "--prompt", "hi"], ["serve", "nosuch"]])
def test_bad_cpu_layers_is_one_line(command):
    result = invoke([*command, "--cpu-layers", "lots"])
    assert result.exit_code == 1 and result.stderr.startswith("error: cpu_layers 'lots'"), result.output
    assert "--cpu-layers auto" in result.stderr and "Traceback" not in result.output


def test_load_options_carry_cpu_layers():
    from gdsllm_core.cli.output import load_options

    assert load_options(None, None).extra["cpu_layers"] == "auto"  # the default
    assert load_options(None, None, "0").extra["cpu_layers"] == 0
    assert load_options("1GiB", None, "7").extra == {"cpu_layers": 7}
