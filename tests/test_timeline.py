"""The throughput timeline (benchmarks/loop/timeline.py): stages laid out from a job's own timings,
and an SVG with a row per job and a bar per stage; docs/throughput-timeline.svg is one of them."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from benchmarks.loop.timeline import COLOURS, draw, spans, tick_step
from tests.conftest import ROOT

SVG = "{http://www.w3.org/2000/svg}"
TIMINGS = {
    "load_input": 300.0,
    "load_loras": 0.0,
    "preprocess_control": 0.0,
    "encode_prompt": 20.0,
    "denoise": 400.0,
    "decode": 60.0,
    "safety": 20.0,
    "encode_image": 100.0,
    "upload": 200.0,
    "total": 1600.0,
}


def test_a_jobs_stages_follow_each_other_and_end_when_its_result_arrived():
    job = spans(TIMINGS, finished=5.0)
    assert [span.stage for span in job] == ["fetch", "wait", "GPU stage", "encode", "upload"]
    assert all(a.end == pytest.approx(b.start) for a, b in zip(job, job[1:], strict=False))
    assert job[-1].end == pytest.approx(5.0)
    assert job[0].start == pytest.approx(5.0 - 1.6)  # the whole of timings.total
    lengths = {span.stage: round(span.end - span.start, 3) for span in job}
    assert lengths == {"fetch": 0.3, "wait": 0.5, "GPU stage": 0.5, "encode": 0.1, "upload": 0.2}


def test_ticks_are_round_and_at_most_ten():
    for length in (0.3, 1.7, 9.0, 42.0, 130.0):
        step = tick_step(length)
        assert length / step <= 10 and f"{step:g}".lstrip("0.")[0] in "125"


def bars(svg: str) -> list[ET.Element]:
    tree = ET.fromstring(svg)  # noqa: S314 (our own file, written by timeline.py)
    return [rect for rect in tree.iter(f"{SVG}rect") if rect.find(f"{SVG}title") is not None]


def test_the_svg_has_a_row_per_job_and_a_bar_per_stage_that_took_time():
    jobs = {f"job {i}": spans(TIMINGS, finished=1.6 + 0.5 * i) for i in range(3)}
    svg = draw(jobs, {label: job[0].start for label, job in jobs.items()}, "a title", ["a caption"])
    drawn = bars(svg)
    assert len(drawn) == 3 * 5
    assert {rect.get("fill") for rect in drawn} == set(COLOURS.values())
    first_gpu = next(r for r in drawn if r.find(f"{SVG}title").text == "job 0: GPU stage 500 ms")
    first_fetch = next(r for r in drawn if r.find(f"{SVG}title").text == "job 0: fetch 300 ms")
    assert float(first_gpu.get("width")) == pytest.approx(float(first_fetch.get("width")) * 5 / 3, abs=0.2)
    assert "a caption" in svg and "<title>a title</title>" in svg


def test_the_picture_in_docs_was_drawn_by_it_and_shows_the_overlap():
    svg = (ROOT / "docs/throughput-timeline.svg").read_text()
    drawn = bars(svg)
    stages = {rect.find(f"{SVG}title").text.split(": ")[1].rsplit(" ", 2)[0] for rect in drawn}
    assert stages == set(COLOURS)
    assert "overlap, not the speed" in svg and "tiny random model" in svg
    # Overlap: some job's GPU stage runs while another job's fetch or upload is under way.
    spans_of = {}
    for rect in drawn:
        label, rest = rect.find(f"{SVG}title").text.split(": ")
        stage = rest.rsplit(" ", 2)[0]
        start = float(rect.get("x"))
        spans_of.setdefault(stage, []).append((label, start, start + float(rect.get("width"))))
    assert any(
        a[0] != b[0] and a[1] < b[2] and b[1] < a[2]
        for a in spans_of["GPU stage"]
        for b in spans_of["fetch"] + spans_of["upload"]
    )
