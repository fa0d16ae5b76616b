"""The README's commands are the ones CI runs."""

from __future__ import annotations

import re

from tests.conftest import REPO


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    command = re.search(r"^TEST_COMMAND='(.*)'$", ci, re.MULTILINE)
    assert command is not None
    assert command.group(1) in (REPO / "README.md").read_text()
