"""CI runs exactly README's test command."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command():
    extracted = subprocess.run(
        ["awk", "/<!-- test-command -->/{getline; getline; print; exit}", "README.md"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert extracted.startswith("python3 -m venv") and "nox -s tests" in extracted
    assert "README.md" in (ROOT / ".ci" / "run").read_text()
