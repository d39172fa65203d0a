"""The Budget value type: parsed once at the edge (CLI, UI, API) with the messages users see."""
from __future__ import annotations

import numpy as np
import pytest

from kvmerge_local.budget import Budget
from kvmerge_local.cli import main
from kvmerge_local.methods import resolve_budget


def test_parse_numbers_strings_and_budgets():
    assert Budget.parse("0.5") == Budget(0.5) and Budget.parse(0.5).is_fraction
    assert Budget.parse("512").value == 512 and isinstance(Budget.parse("512.0").value, int)
    assert Budget.parse("1").value == 1.0 and Budget.parse("1").is_fraction  # "1" is the whole document
    assert Budget.parse(np.int64(3)).value == 3 and type(Budget.parse(np.int64(3)).value) is int
    b = Budget(0.25)
    assert Budget.parse(b) is b and str(b) == "0.25"


@pytest.mark.parametrize("bad,msg", [("abc", "budget must be a fraction in \\(0, 1\\] or a cell count, got 'abc'"),
                                     (1.5, "a fractional budget must be in \\(0, 1\\], got 1.5"),
                                     ("-0.2", "a fractional budget must be in \\(0, 1\\]"),
                                     (0, "an absolute budget must be >= 1 cell, got 0"),
                                     (True, "positive int cell count, got True"), (None, "got None"),
                                     (float("nan"), "fractional budget")])
def test_bad_budgets_name_the_rule(bad, msg):
    with pytest.raises(ValueError, match=msg):
        Budget.parse(bad)


def test_cells_match_resolve_budget():
    for b, n in ((0.5, 4096), (1.0, 7), (1, 7), (100, 7), (0.01, 10), (0.35, 999)):
        assert Budget(b).cells(n) == resolve_budget(b, n)
    assert Budget(0.5).cells(4096) == 2048 and Budget(100).cells(7) == 7 and Budget(0.01).cells(10) == 1
    with pytest.raises(ValueError, match="cannot compress 0 cells"):
        Budget(0.5).cells(0)


def test_cli_refuses_an_out_of_range_budget_before_opening_a_model(tmp_path, capsys):
    doc = tmp_path / "d.txt"
    doc.write_text("hello")
    with pytest.raises(SystemExit) as e:
        main(["ask", "--model", str(tmp_path / "never-opened.gguf"), "--doc", str(doc), "-q", "x", "--budget", "1.5"])
    assert e.value.code == 2
    assert "a fractional budget must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_ui_settings_refuse_an_out_of_range_budget():
    from kvmerge_local.ui.choices import Settings

    assert Settings.from_ui(None, "kvmerger", 0.35, "f16", 2048).budget == 0.35
    with pytest.raises(ValueError, match="a fractional budget must be in"):
        Settings.from_ui(None, "kvmerger", 1.5, "f16", 2048)
