"""Layer 1: the access decision against a plain statement of the rules, and the audit chain."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from animfs import audit
from animfs.access import (
    ALL,
    CLOSED,
    IN_ORDER,
    OPTED_OUT,
    BreakGlass,
    Consent,
    PatientState,
    decide_open,
    may_list,
    may_see,
)
from animfs.config import User

INSTITUTIONS = ("CHL", "HRS", "CHEM", "ZITHA")
UID = 1001
NOW = 1_700_000_000.0

# -- the rules, stated plainly over abstract states ----------------------------------------

CONSENT_STATES = ("to-this", "to-all", "to-other", "expired", "revoked")
GRANT_STATES = ("active", "expired", "other-uid", "not-yet")


def rule_of(
    role: str | None,
    own: bool,
    consents: list[str],
    record: str,
    grants: list[str],
) -> tuple[bool, str]:
    """DESIGN.md "Who may open what", restated: (allowed, the rule that decided)."""
    if role is None:
        return False, "unmapped"
    if role == "backup":
        return True, "backup"
    if role == "admin":
        return False, "admin"
    if own:
        return True, "own-institution"
    if "active" in grants:
        return True, "break-glass"
    if record == OPTED_OUT:
        return False, "opted-out"
    if record == CLOSED:
        return False, "record-closed"
    if "to-this" in consents or "to-all" in consents:
        return True, "consent"
    return False, "no-consent"


# -- concrete states built from the abstract ones ---------------------------------------


@st.composite
def consent(draw: st.DrawFn, kind: str, mine: str, other: str) -> Consent:
    granted = NOW - draw(st.floats(0, 1e7))
    later = draw(st.floats(min_value=0.001, max_value=1e7))
    earlier = draw(st.floats(min_value=0, max_value=1e7))  # 0: expires exactly now
    until = draw(st.sampled_from([None, NOW + later]))
    if kind == "to-this":
        return Consent(mine, granted, until)
    if kind == "to-all":
        return Consent(ALL, granted, until)
    if kind == "to-other":
        return Consent(other, granted, until)
    if kind == "expired":
        return Consent(draw(st.sampled_from([mine, ALL])), granted, NOW - earlier)
    return Consent(draw(st.sampled_from([mine, ALL])), granted, until, revoked=NOW - earlier)


@st.composite
def grant(draw: st.DrawFn, kind: str) -> BreakGlass:
    reason = draw(st.text(min_size=1, max_size=20))
    ahead = draw(st.floats(min_value=0.001, max_value=1e6))
    behind = draw(st.floats(min_value=0, max_value=1e6))
    if kind == "active":
        return BreakGlass(UID, NOW - behind, NOW + ahead, reason)
    if kind == "expired":
        return BreakGlass(UID, NOW - behind - 1, NOW - behind, reason)
    if kind == "other-uid":
        return BreakGlass(UID + 1, NOW - behind, NOW + ahead, reason)
    return BreakGlass(UID, NOW + ahead, NOW + ahead + 1, reason)  # not yet begun


@st.composite
def case(draw: st.DrawFn) -> tuple[User | None, str, PatientState, tuple[bool, str]]:
    role = draw(st.sampled_from([None, "clinician", "admin", "backup"]))
    mine = draw(st.sampled_from(INSTITUTIONS))
    study = draw(st.sampled_from(INSTITUTIONS))
    other = draw(st.sampled_from([i for i in INSTITUTIONS if i != mine]))
    consent_kinds = draw(st.lists(st.sampled_from(CONSENT_STATES), max_size=3))
    grant_kinds = draw(st.lists(st.sampled_from(GRANT_STATES), max_size=2))
    record = draw(st.sampled_from([IN_ORDER, CLOSED, OPTED_OUT]))
    state = PatientState(
        consents=tuple(draw(consent(k, mine, other)) for k in consent_kinds),
        record=record,
        grants=tuple(draw(grant(k)) for k in grant_kinds),
    )
    user = None if role is None else User(UID, "someone", mine, role)
    expected = rule_of(role, mine == study, consent_kinds, record, grant_kinds)
    return user, study, state, expected


@settings(max_examples=3000, deadline=None)
@given(case())
def test_decision_matches_the_rules(
    example: tuple[User | None, str, PatientState, tuple[bool, str]],
) -> None:
    user, study, state, (allowed, rule) = example
    decision = decide_open(user, study, state, NOW)
    assert (decision.allowed, decision.rule) == (allowed, rule)
    assert decision.break_glass == (rule == "break-glass")
    # Listings: nothing for an unmapped uid, everything for admin and backup, and for a
    # clinician exactly what they may open.
    assert may_list(user) == (user is not None)
    expected_seen = user is not None and (user.role != "clinician" or allowed)
    assert may_see(user, study, state, NOW) == expected_seen


def test_every_combination_of_states_is_covered() -> None:
    """The exhaustive grid behind the property test, one consent and one grant at a time."""
    seen = set()
    for role in (None, "clinician", "admin", "backup"):
        for own in (True, False):
            for c in (*CONSENT_STATES, None):
                for g in (*GRANT_STATES, None):
                    for record in (IN_ORDER, CLOSED, OPTED_OUT):
                        mine, study = "CHL", "CHL" if own else "HRS"
                        state = PatientState(
                            consents=() if c is None else (concrete_consent(c, mine),),
                            record=record,
                            grants=() if g is None else (concrete_grant(g),),
                        )
                        user = None if role is None else User(UID, "x", mine, role)
                        got = decide_open(user, study, state, NOW)
                        want = rule_of(role, own, [c] if c else [], record, [g] if g else [])
                        assert (got.allowed, got.rule) == want, (role, own, c, g, record)
                        seen.add(got.rule)
    assert seen == {
        "unmapped",
        "backup",
        "admin",
        "own-institution",
        "break-glass",
        "opted-out",
        "record-closed",
        "consent",
        "no-consent",
    }


def concrete_consent(kind: str, mine: str) -> Consent:
    return {
        "to-this": Consent(mine, NOW - 10),
        "to-all": Consent(ALL, NOW - 10, NOW + 10),
        "to-other": Consent("ZITHA", NOW - 10),
        "expired": Consent(mine, NOW - 10, NOW),
        "revoked": Consent(ALL, NOW - 10, None, revoked=NOW - 1),
    }[kind]


def concrete_grant(kind: str) -> BreakGlass:
    return {
        "active": BreakGlass(UID, NOW - 1, NOW + 1, "trauma"),
        "expired": BreakGlass(UID, NOW - 2, NOW, "trauma"),
        "other-uid": BreakGlass(UID + 1, NOW - 1, NOW + 1, "trauma"),
        "not-yet": BreakGlass(UID, NOW + 1, NOW + 2, "trauma"),
    }[kind]


# -- the audit chain -------------------------------------------------------------------


def write_log(path: Path, n: int) -> list[bytes]:
    log = audit.AuditFile(path)
    try:
        for i in range(n):
            log.append([{"event": "open", "n": i, "patient": "CHL-1", "path": f"/p/{i}"}])
    finally:
        log.close()
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def test_intact_chain_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path, 6)
    verdict = audit.verify(path)
    assert verdict.intact and verdict.lines == 6
    assert json.loads(lines[0])["prev"] == audit.GENESIS
    for before, after in zip(lines, lines[1:], strict=False):
        assert json.loads(after)["prev"] == audit.hashlib.sha256(before.rstrip(b"\n")).hexdigest()


@pytest.mark.parametrize("k", range(1, 7))
def test_an_edited_line_is_named(tmp_path: Path, k: int) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path, 6)
    lines[k - 1] = lines[k - 1].replace(b'"/p/', b'"/q/')
    rewrite(path, lines)
    verdict = audit.verify(path)
    assert verdict.broken_line == k
    assert "edited" in verdict.problem


def test_an_edit_that_rehashes_its_line_is_caught_at_the_next(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path, 4)
    entry = json.loads(lines[1])
    entry["decision"] = "allow"
    lines[1] = audit.seal(entry, entry["prev"]) + b"\n"
    rewrite(path, lines)
    assert audit.verify(path).broken_line == 3


@pytest.mark.parametrize("k", range(1, 6))
def test_a_deleted_line_is_named(tmp_path: Path, k: int) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path, 6)
    del lines[k - 1]
    rewrite(path, lines)
    verdict = audit.verify(path)
    assert verdict.broken_line == k  # the line that now stands where the deleted one was
    assert "deleted" in verdict.problem


@pytest.mark.parametrize("k", range(1, 6))
def test_swapped_lines_are_named(tmp_path: Path, k: int) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path, 6)
    lines[k - 1], lines[k] = lines[k], lines[k - 1]
    rewrite(path, lines)
    assert audit.verify(path).broken_line == k


def test_a_torn_last_line_is_named_and_appends_continue(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = write_log(path, 3)
    rewrite(path, [*lines[:2], lines[2][:20]])  # a crash mid-write
    audit.append(path, {"event": "open", "n": 99})
    verdict = audit.verify(path)
    assert verdict.broken_line == 3 and "JSON" in verdict.problem
    assert len(path.read_bytes().splitlines()) == 4


def test_two_writers_never_fork_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    logs = [audit.AuditFile(path), audit.AuditFile(path)]

    def write(log: audit.AuditFile, who: int) -> None:
        for i in range(100):
            log.append([{"event": "open", "who": who, "n": i}])

    threads = [threading.Thread(target=write, args=(log, i)) for i, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for log in logs:
        log.close()
    verdict = audit.verify(path)
    assert verdict.intact and verdict.lines == 200


def test_group_commit_batches_concurrent_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = audit.AuditFile(path)
    durable: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            writer = audit.GroupCommit(log, nursery)

            async def one(i: int) -> None:
                await writer.record({"event": "open", "n": i})
                # Durable on return: the line is in the file already.
                assert f'"n":{i},'.encode() in path.read_bytes()
                durable.append(i)

            async with trio.open_nursery() as opens:
                for i in range(64):
                    opens.start_soon(one, i)
            assert writer.lines == 64
            assert writer.batches < 64  # lines that arrived together shared an fsync
            nursery.cancel_scope.cancel()

    trio.run(main)
    log.close()
    assert sorted(durable) == list(range(64))
    assert audit.verify(path).lines == 64
