"""Changing who may open what: consents, record states and break-the-glass grants.

Each change is written to the audit log first and to the index second, so
that no change ever takes effect without its line (a failure in between
leaves a line for a change that did not happen, which the next attempt
repeats).  A running mount reads the index on every open, so a change takes
effect on the next open without a remount.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any

from animfs import audit
from animfs.access import ALL, RECORD_STATES, BreakGlass, Consent
from animfs.config import Config
from animfs.index import Index

MAX_BREAK_GLASS_HOURS = 24.0


class Refused(Exception):
    """The change cannot be made; the message says why, in one line."""


def parse_until(text: str, now: float) -> float:
    """``--until``: a date (consent runs to the end of that day, local time) or an ISO
    date and time.  Must lie in the future."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime.combine(day + timedelta(days=1), datetime.min.time())
        else:
            moment = datetime.fromisoformat(text)
    except ValueError:
        raise Refused(f"--until {text!r}: not a date (YYYY-MM-DD) or date and time") from None
    until = moment.timestamp()  # naive times are local
    if until <= now:
        raise Refused(f"--until {text}: that is already past")
    return until


class Changes:
    """Consent, record and break-the-glass changes, made by ``uid``."""

    def __init__(
        self,
        config: Config,
        index: Index,
        *,
        uid: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config, self.index, self.uid, self.clock = config, index, uid, clock

    def _patient(self, patient: str) -> str:
        if self.index.find_ino(b"P\0" + patient.encode()) is None:
            raise Refused(f"no patient {patient} in the archive (name patients ISSUER-PATIENTID)")
        return patient

    def _institution(self, to: str) -> str:
        if to == ALL:
            return ALL
        code = self.config.institutions.get(to, to)
        known = set(self.config.institutions.values())
        known |= {user.institution for user in self.config.users.values()}
        if known and code not in known:
            known_text = ", ".join(sorted(known))
            raise Refused(f"--to {to}: not an institution of the config ({known_text})")
        return code

    def _audit(self, event: str, patient: str, now: float, **fields: Any) -> None:
        user = self.config.users.get(self.uid)
        entry = {
            "time": audit.now_text(now),
            "event": event,
            "uid": self.uid,
            "user": user.name if user else None,
            "patient": patient,
            **fields,
        }
        audit.append(self.config.audit_path, entry)

    def grant(self, patient: str, to: str, until: str | None) -> Consent:
        now = self.clock()
        patient, to = self._patient(patient), self._institution(to)
        consent = Consent(to=to, granted=now, until=parse_until(until, now) if until else None)
        until_text = audit.now_text(consent.until) if consent.until else None
        self._audit("consent-grant", patient, now, to=to, until=until_text)
        self.index.put_consent(patient, consent)
        return consent

    def revoke(self, patient: str, to: str) -> Consent:
        now = self.clock()
        patient, to = self._patient(patient), self._institution(to)
        current = {c.to: c for _, c in self.index.consents(patient)}.get(to)
        if current is None or current.revoked is not None:
            raise Refused(f"{patient} has no consent to {to} in force")
        self._audit("consent-revoke", patient, now, to=to)
        revoked = dataclasses.replace(current, revoked=now)
        self.index.put_consent(patient, revoked)
        return revoked

    def set_record(self, patient: str, state: str) -> None:
        if state not in RECORD_STATES:
            raise Refused(f"record state must be one of {', '.join(RECORD_STATES)}")
        now = self.clock()
        patient = self._patient(patient)
        self._audit("record-set", patient, now, state=state)
        self.index.set_record(patient, state)

    def break_glass(self, patient: str, reason: str, hours: float) -> BreakGlass:
        """A grant for the calling uid, who must be a clinician of the config."""
        user = self.config.users.get(self.uid)
        if user is None or user.role != "clinician":
            raise Refused(f"uid {self.uid} is no clinician in the config: break-the-glass refused")
        if not reason.strip():
            raise Refused("break-the-glass needs a --reason; refused")
        if not 0 < hours <= MAX_BREAK_GLASS_HOURS:
            raise Refused(f"--hours must be more than 0 and at most {MAX_BREAK_GLASS_HOURS:g}")
        now = self.clock()
        patient = self._patient(patient)
        grant = BreakGlass(uid=self.uid, granted=now, until=now + hours * 3600, reason=reason)
        self._audit(
            "break-glass",
            patient,
            now,
            institution=user.institution,
            reason=reason,
            until=audit.now_text(grant.until),
        )
        self.index.put_break_glass(patient, grant)
        return grant
