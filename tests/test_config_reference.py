"""docs/config.md is generated from the config dataclasses and kept complete and current."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import pytest

from launcher.commands.config_reference import SECTIONS, main, reference

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "config.md"


def test_the_committed_reference_is_current():
    """Fails when a key is added, renamed or redescribed without regenerating the file."""
    assert main(["--check", str(DOC)]) == 0, \
        "regenerate: python -m launcher.commands.config_reference > docs/config.md"
    text = DOC.read_text()
    for name, cls in SECTIONS.items():
        assert f"## [{name}]" in text
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f"{name}.{f.name}"


def test_a_key_without_a_description_is_refused():
    @dataclasses.dataclass
    class Table:
        documented: int = 1
        """Has one."""
        bare: Optional[str] = None

    with pytest.raises(ValueError, match=r"^demo\.bare has no description"):
        reference({"demo": Table})


def test_types_and_defaults_read_as_toml():
    text = reference()
    assert "| `steps` | int | `200` |" in text
    assert "| `env` | table | `{}` |" in text
    assert "| `betas` | [float, float] | `[0.9, 0.999]` |" in text
    assert "| `bucket_numel` | int or unset | `unset` |" in text
    assert "| `use_gpu` | bool | `false` |" in text and '| `precision` | str | `"auto"` |' in text
