"""runtime/config.py in-process: bad values are one-line ConfigErrors, before anything starts."""
from __future__ import annotations

import pytest

from runtime.config import ConfigError, parse_args


@pytest.mark.parametrize("method,sets,message", [
    ("simclr", ["method.loss=triplet"], "method.loss must be one of nt_xent, align_uniform, hard_negative, cmc"),
    ("moco", ["method.loss=cmc"], "method.loss=cmc is a SimCLR loss"),
    ("simclr", ["method.positives=4"], "more than one positive is CACR's, or SimCLR's with method.loss=cmc"),
    ("interclr", ["bank.labels=sometimes"], "bank.labels must be online or offline, got 'sometimes'"),
])
def test_bad_values_are_one_line_config_errors(method, sets, message):
    argv = ["--preset", "demo"] + [arg for item in sets for arg in ("--set", item)]
    with pytest.raises(ConfigError) as error:
        parse_args(argv, method=method, default_preset="demo")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_multi_view_cl_and_offline_labels_are_accepted():
    config, _ = parse_args(["--preset", "demo", "--set", "method.loss=cmc", "--set", "method.positives=4"],
                           method="simclr", default_preset="demo")
    assert (config.method.loss, config.method.positives) == ("cmc", 4)
    config, _ = parse_args(["--preset", "demo", "--set", "bank.labels=offline"], default_preset="demo")
    assert config.bank.labels == "offline"
