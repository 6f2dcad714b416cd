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
    presets = {preset["name"]: preset for preset in hub["presets"]}
    for preset, claim in (
        ("Turbo", "Turbo only"),
        ("Turbo + ControlNet", "Structural control"),
        ("Turbo + Tile ControlNet", "Upscaling with the Tile ControlNet"),
    ):
        plan = table[preset][1].split("`")[1]  # on 24 GB
        (name,) = [name for name in presets if claim in name]
        assert f"24 GB GPUs with the {plan} memory plan" in name, (preset, name)
    # Turbo and the base on 24 GB: refused, or an estimate within 0.5 GB of the card (too thin to offer).
    both = table["Turbo + base"][1]
    assert both.startswith("refused") or float(both.split(", ")[-1].split(" GB")[0]) > 23.5, both
    assert table["Turbo + base"][2].startswith("`")
    assert table["Turbo + Tile ControlNet"][1].startswith("`fp8`")  # the upscaling preset's 24 GB
