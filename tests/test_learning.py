"""benchmarks/learning.py: every cell of the grid is a config the job accepts, with the issue's
settings, and the dry run says what it would cost (nothing is trained here)."""
from __future__ import annotations

import pytest

from tests import datasets


@pytest.fixture(scope="module")
def learning():
    yield from datasets.benchmark_module("learning")


def test_every_grid_cell_is_a_valid_job_config_with_its_settings(learning):
    cells = learning.grid()
    assert len({c.name for c in cells}) == len(cells) == 32  # 4 encoders x 4 methods x with/without locals
    for cell in cells:
        config = learning.build_config(cell, learning.overrides_for(cell, 60.0))
        assert config.method.name == cell.method and config.data.image_size == cell.image_size
        assert config.eval.monitor_samples is None and config.eval.monitor_every >= 1  # the 60k memory
        assert config.data.local_crops == cell.local_crops
        assert learning.estimate_seconds(cell, config.train.epochs) <= 60 * 60 or config.train.epochs == 1


def test_dry_run_lists_the_grid_and_refuses_an_unknown_cell(learning, capsys):
    lines = []
    assert learning.main(["--dry-run"], log=lines.append) == 0
    assert len(lines) == 33 and lines[-1].startswith("learning:")
    assert learning.main(["--only", "moco-nothing"], log=lines.append) == 2
    assert "unknown cell" in capsys.readouterr().err
