"""docs/memory.md's table is the estimator's own output, and the listing follows it."""

from __future__ import annotations

import json

import pytest

from benchmarks.memory_table import rows
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def table() -> dict[str, list[str]]:
    lines = rows()
    return {line.split(" | ")[0].strip("| "): line.split(" | ")[2:] for line in lines[2:]}


def test_docs_hold_the_estimators_table():
    page = (ROOT / "docs/memory.md").read_text()
    for line in rows():
        assert line in page, f"docs/memory.md is stale: run python benchmarks/memory_table.py\n{line}"
    assert "Every figure is an estimate" in page


def test_the_listing_offers_the_cards_a_plan_serves(table):
    hub = json.loads((ROOT / ".runpod/hub.json").read_text())["config"]
    sixteen = [cells[0] for cells in table.values()]
    assert all(cell.startswith("refused") for cell in sixteen)  # so no 16 GB pool is offered
    assert not {"AMPERE_16", "ADA_16"} & set(hub["gpuIds"].split(","))
    names = " ".join(preset["name"] for preset in hub["presets"])
    for preset, claim in (("Turbo", "Turbo only"), ("Turbo + ControlNet", "Structural control")):
        assert table[preset][1].startswith("`fp8`"), preset  # 24 GB
        assert claim in names and "24 GB GPUs with the fp8 memory plan" in names
    assert table["Turbo + base"][1].startswith("refused") and table["Turbo + base"][2].startswith("`")
