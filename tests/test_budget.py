"""Line budgets of style.md §5, re-checked on every run so the README's size claims stay true.
Run: python -m pytest tests/test_budget.py"""
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUDGET = {"model.py": 450, "ssm_scan.py": 450, "mla.py": 400, "convert.py": 550, "distill.py": 550,
          "generate.py": 200, "bench.py": 250, "README.md": 200, "requirements.txt": 5}


@pytest.mark.parametrize("name,limit", BUDGET.items())
def test_file_within_budget(name, limit):
    n = len((ROOT / name).read_text().splitlines())
    assert n <= limit, f"{name} has {n} lines, budget {limit}"
