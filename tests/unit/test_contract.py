"""The run-directory contract: every event is defined once, stamped in one place, and
documented in docs/run-directory.md; exit codes are defined once."""

import ast
import re
from pathlib import Path

import pytest

from telepathy.config.schema import PreemptionConfig
from telepathy.core import exits
from telepathy.core.events import EVAL_FIELDS, EVENTS, METRICS_FIELDS, Event, SaveResult, Stamp
from tests.support import ROOT

PACKAGE = ROOT / "telepathy"
RUN_DIRECTORY_PAGE = ROOT / "docs" / "run-directory.md"


def test_every_event_is_documented_in_the_run_directory_page_and_nothing_else_is():
    section = RUN_DIRECTORY_PAGE.read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", section, re.M))
    documented = set(rows)
    assert documented == {e.value for e in Event}, (
        f"undocumented: {sorted({e.value for e in Event} - documented)}; "
        f"documented but not an event: {sorted(documented - {e.value for e in Event})}")
    assert set(EVENTS) == set(Event)
    for event, (when, fields) in EVENTS.items():
        assert rows[event.value] == f"{when} | {fields}", (
            f"docs/run-directory.md's row of {event.value}")
    for column in METRICS_FIELDS + EVAL_FIELDS:
        assert column in section, f"metrics.jsonl column {column} is not in docs/run-directory.md"


def _event_keys(path: Path) -> list[int]:
    """Lines of dict literals with an "event" key: events written past the contract."""
    tree = ast.parse(path.read_text())
    return [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Dict)
            and any(isinstance(k, ast.Constant) and k.value == "event" for k in node.keys)]


def test_events_are_written_only_through_the_contract():
    offenders = {str(p.relative_to(ROOT)): lines for p in PACKAGE.rglob("*.py")
                 if p != PACKAGE / "core" / "events.py" and (lines := _event_keys(p))}
    assert not offenders, f"events built by hand instead of Stamp.record: {offenders}"


def test_every_event_is_emitted_somewhere():
    code = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py")
                     if p != PACKAGE / "core" / "events.py")
    emitted = set(re.findall(r"\b(?:emit|report)\(\s*Event\.(\w+)", code))  # report: the mirror's
    assert "emit(result.event" in code  # checkpoint_saved / checkpoint_failed: a SaveResult's
    emitted |= {"CHECKPOINT_SAVED", "CHECKPOINT_FAILED"}
    unused = [e.name for e in Event if e.name not in emitted]
    assert not unused, f"events defined but never emitted: {unused}"


def test_a_stamp_refuses_an_unknown_event_and_stamps_the_rest():
    stamp = Stamp(restart=2, job_id="17", world_size=4)
    with pytest.raises(ValueError, match="unknown event 'checkpoint_savd'"):
        stamp.record("checkpoint_savd")
    assert stamp.record(Event.FINISHED, now=5.0, step=9) == {
        "event": "finished", "time": 5.0, "restart": 2, "job_id": "17", "world_size": 4, "step": 9}


def test_a_save_result_is_one_of_two_events():
    ok = SaveResult(3, "final", "step_00000003", 0.1, 0.2, bytes=10, files=2)
    bad = SaveResult(3, "final", "step_00000003", 0.1, 0.2, error="rank 1: OSError")
    assert (ok.event, bad.event) == (Event.CHECKPOINT_SAVED, Event.CHECKPOINT_FAILED)
    assert "error" not in ok.fields() and "bytes" not in bad.fields()


def test_exit_codes_are_defined_once():
    assert PreemptionConfig().exit_code == exits.PREEMPTED == 75
    literal = re.compile(r"\breturn (0|1|2|75)$", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                 if p.parent.name != "core" and literal.search(p.read_text())]
    assert not offenders, f"exit codes as literals instead of telepathy.core.exits: {offenders}"
