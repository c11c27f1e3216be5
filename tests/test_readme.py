"""The README is the user's manual: its first screen runs the product and the tests, and its table lists every knob."""
import re

import train_gpt as tg
from conftest import REPO_ROOT as ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_first_screen_has_the_two_commands():
    first_screen = "\n".join(README.splitlines()[:40])
    assert "python3 scripts/demo.py" in first_screen and (ROOT / "scripts" / "demo.py").is_file()
    assert "pytest" in first_screen
    assert "torchrun --standalone --nproc_per_node=8 train_gpt.py" in README


def test_every_knob_is_documented_with_its_default():
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", README))
    knobs = tg.Hyperparameters(env={}).values
    missing = sorted(set(knobs) - documented)
    assert not missing, f"README table lacks {missing}"
    table = {}
    for line in README.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) == 3 and cells[0].startswith("`"):
            names, defaults = cells[0].split(" / "), cells[1].split(" / ")
            if len(names) == len(defaults):
                table.update((n.strip("`"), d.strip("`").split(" (")[0]) for n, d in zip(names, defaults))
    numeric = {n: v for n, v in knobs.items() if isinstance(v, (int, float)) and n in table}
    assert len(numeric) > 40
    for name, value in numeric.items():  # every number the table gives is the default the script uses
        assert float(table[name]) == float(value), (name, table[name], value)
    assert table["SSM_LAYERS"] == tg.env_string(knobs["SSM_LAYERS"])
    assert table["SSM_MODE"] == knobs["SSM_MODE"] and table["SSM_KERNEL"] == knobs["SSM_KERNEL"]


def test_the_readme_stays_a_manual():
    assert len(README.splitlines()) <= 200  # measurement history lives in logs/README.md
    assert "logs/README.md" in README and (ROOT / "logs" / "README.md").is_file()


def test_ci_runs_the_readme_test_command():
    assert "pytest -q tests" in (ROOT / ".ci" / "run").read_text()


def test_the_install_lines_pin_the_tested_torch():
    """A bare "torch" resolves to whatever is newest (and, on PyPI, a CUDA build): each install line names the build
    that the runs used."""
    for name, pin in (("requirements.txt", "torch==2.11.0+cu130"), ("requirements-cpu.txt", "torch==2.13.0+cpu")):
        lines = [line.strip() for line in (ROOT / name).read_text().splitlines()]
        assert pin in lines and f"pip install -r {name}" in README, name
        assert not [line for line in lines if line.startswith("torch") and line != pin], name
