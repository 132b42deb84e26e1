"""The committed JSON Schemas in ``schemas/`` match the command models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS_DIR = ROOT / "schemas"
REGENERATE = "run `python scripts/gen_schemas.py` and commit schemas/"


def load_generator() -> ModuleType:
    """``scripts/gen_schemas.py`` as a module, loaded from its file (it runs as a plain script)."""
    spec = importlib.util.spec_from_file_location("gen_schemas", ROOT / "scripts" / "gen_schemas.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_schemas_match_models() -> None:
    expected: dict[str, str] = load_generator().render_schemas()
    committed = {path.name: path.read_text(encoding="utf-8") for path in SCHEMAS_DIR.glob("*.json")}
    missing = sorted(expected.keys() - committed.keys())
    extra = sorted(committed.keys() - expected.keys())
    drifted = sorted(name for name in expected.keys() & committed.keys() if committed[name] != expected[name])
    assert not (missing or extra or drifted), (
        f"schemas/ is out of date (missing: {missing}, extra: {extra}, drifted: {drifted}); {REGENERATE}"
    )


@pytest.mark.parametrize("path", sorted(SCHEMAS_DIR.glob("*.json")), ids=lambda path: path.name)
def test_schema_file_is_closed_json(path: Path) -> None:
    schema = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(schema, dict), f"{path.name}: not a JSON object"
    assert schema.get("additionalProperties") is False, f"{path.name}: additionalProperties is not false"
