"""Who may open what: the rules of DESIGN.md "Who may open what", as pure functions.

Nothing here reads the index, the clock or the config: the caller passes the
user (``None`` for a uid the config does not map), the institution that produced
the study, the patient's consent, record and break-the-glass state, and the
time.  :func:`decide_open` answers an open; :func:`may_see` answers whether a
patient or study shows up in a listing.

The rules, in the order they are applied to an open:

1. An unmapped uid opens nothing (rule ``unmapped``).
2. The backup role opens everything (``backup``); an admin nothing (``admin``).
3. A clinician opens the studies of their own institution (``own-institution``).
4. ... and any study of a patient for whom they hold an unexpired
   break-the-glass grant (``break-glass``), whatever the record says: it exists
   for emergencies, and it is always audited.
5. Sharing with other institutions stops when the patient opted out
   (``opted-out``) or the shared record is not in order (``record-closed``).
6. Otherwise a consent that covers the clinician's institution (or all), is
   not revoked and has not expired opens it (``consent``); without one the
   answer is no (``no-consent``).

Times are seconds since the epoch; a consent or grant whose ``until`` is at or
before ``now`` has expired.  A patient without a record state is in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from animfs.config import User

ALL = "all"  # a consent to every institution

IN_ORDER, CLOSED, OPTED_OUT = "in-order", "closed", "opted-out"
RECORD_STATES = (IN_ORDER, CLOSED, OPTED_OUT)

# The rules a decision can name; the audit log records them verbatim.
ALLOWING = ("backup", "own-institution", "break-glass", "consent")
DENYING = ("unmapped", "admin", "opted-out", "record-closed", "no-consent")


@dataclass(frozen=True)
class Consent:
    """A patient's consent to share their imaging with ``to`` (an institution code or "all")."""

    to: str
    granted: float
    until: float | None = None  # None: until revoked
    revoked: float | None = None  # kept, not deleted, so `consent list` shows history

    def covers(self, institution: str, now: float) -> bool:
        return (
            self.to in (institution, ALL)
            and self.revoked is None
            and (self.until is None or now < self.until)
        )


@dataclass(frozen=True)
class BreakGlass:
    """Emergency access to one patient's imaging for one uid, until a time."""

    uid: int
    granted: float
    until: float
    reason: str

    def active(self, uid: int, now: float) -> bool:
        return self.uid == uid and self.granted <= now < self.until


@dataclass(frozen=True)
class PatientState:
    """Everything about a patient that the rules look at besides the study."""

    consents: tuple[Consent, ...] = ()
    record: str = IN_ORDER
    grants: tuple[BreakGlass, ...] = ()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str

    @property
    def break_glass(self) -> bool:
        return self.rule == "break-glass"


def decide_open(
    user: User | None, study_institution: str, state: PatientState, now: float
) -> Decision:
    """May ``user`` open a file of a study produced by ``study_institution``?"""
    if user is None:
        return Decision(False, "unmapped")
    if user.role == "backup":
        return Decision(True, "backup")
    if user.role != "clinician":
        return Decision(False, "admin")
    if user.institution == study_institution:
        return Decision(True, "own-institution")
    if any(grant.active(user.uid, now) for grant in state.grants):
        return Decision(True, "break-glass")
    if state.record == OPTED_OUT:
        return Decision(False, "opted-out")
    if state.record != IN_ORDER:
        return Decision(False, "record-closed")
    if any(consent.covers(user.institution, now) for consent in state.consents):
        return Decision(True, "consent")
    return Decision(False, "no-consent")


def may_list(user: User | None) -> bool:
    """May ``user`` list folders at all?  Every mapped user may; an unmapped uid may not."""
    return user is not None


def may_see(user: User | None, study_institution: str, state: PatientState, now: float) -> bool:
    """Does a study show in ``user``'s listings?  Names are identifying, so a clinician
    sees only what they may open; admins and backup see everything."""
    if user is None:
        return False
    if user.role != "clinician":
        return True
    return decide_open(user, study_institution, state, now).allowed
