"""Where the tree meets the access rules: which patient and study a node belongs to,
the patient's current state from the index, and the decision of :mod:`animfs.access`.

Access control is on as soon as the config maps any uid (``[users.<uid>]``);
then it applies to every uid, root included unless root is listed.  With no
``[users]`` at all it is off: every uid may list and open everything, and opens
are not audited.  That is the single-user setup ``animfs init`` writes, and
the one the tests of the storage layers use.

Consent, record and break-the-glass state is read from the index on every
decision (one short read transaction), so ``animfs consent ...`` and friends
take effect on the next open of a running mount.  Which patient, study and
institution a node belongs to never changes once written, so that is
remembered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from animfs.access import Decision, decide_open, may_see
from animfs.config import User
from animfs.index import LINK, PATIENTS_INO, STUDIES_INO, VIEWS, Index, Node
from animfs.manifest import Manifest

_MEMO_MAX = 1 << 17  # remembered node facts; cleared wholesale when full
_T = TypeVar("_T")


@dataclass(frozen=True)
class Study:
    patient: str  # patient key, issuer "-" PatientID
    uid: str  # StudyInstanceUID
    institution: str  # code of the institution that produced it


@dataclass(frozen=True)
class _Place:
    """Where a node sits: its patient folder and study folder, where it has them."""

    patient_ino: int | None = None
    study_ino: int | None = None


_NOWHERE = _Place()


class Guard:
    def __init__(
        self, index: Index, users: Mapping[int, User], clock: Callable[[], float] = time.time
    ) -> None:
        self.index = index
        self.users = users
        self.clock = clock
        self.enforced = bool(users)
        self._places: dict[int, _Place] = {}
        self._studies: dict[int, Study | None] = {}

    def user(self, uid: int) -> User | None:
        return self.users.get(uid)

    def streams_past_cache(self, uid: int) -> bool:
        """Do ``uid``'s reads bypass the caches?  The backup role's do: it reads
        everything once, and must not push out what clinicians will read again."""
        user = self.users.get(uid)
        return user is not None and user.role == "backup"

    # -- opens ---------------------------------------------------------------------------

    def decide_open(self, uid: int, manifest: Manifest) -> tuple[User | None, Study, Decision]:
        """The decision on ``uid`` opening the instance of ``manifest``, and what it was about."""
        inst = manifest.instance
        study = Study(inst.patient_key, inst.study_uid, manifest.institution)
        user = self.user(uid)
        state = self.index.patient_state(study.patient)
        return user, study, decide_open(user, study.institution, state, self.clock())

    def decide_node(self, uid: int, node: Node) -> tuple[User | None, Study | None, Decision]:
        """The open decision for the study a node leads to (for a patient folder, its
        first study): what a refused lookup of ``node`` would have been, for the audit log."""
        place = self._place(node)
        study_ino = place.study_ino
        if study_ino is None and place.patient_ino is not None:
            first = self.index.entries(place.patient_ino, None, 1)
            study_ino = first[0].ino if first else None
        study = self._study(study_ino) if study_ino is not None else None
        user = self.user(uid)
        if study is None:
            return user, None, Decision(False, "not-visible")
        state = self.index.patient_state(study.patient)
        return user, study, decide_open(user, study.institution, state, self.clock())

    # -- listings ------------------------------------------------------------------------

    def may_see(self, uid: int, node: Node) -> bool:
        """May ``uid`` look up, stat through a listing, or enter ``node``?

        Unmapped uids see nothing; admins and backup everything; a clinician a
        patient folder when they may open at least one of its studies, and a
        study (its folder, everything below it, its links under /studies and the
        views) when they may open it.
        """
        if not self.enforced:
            return True
        user = self.user(uid)
        if user is None:
            return False
        if user.role != "clinician":
            return True
        place = self._place(node)
        if place.study_ino is not None:
            return self._study_visible(user, place.study_ino)
        if place.patient_ino is not None:
            return self._patient_visible(user, place.patient_ino)
        return True  # /, /patients, /studies and anything outside the patients' tree

    def filters(self, uid: int, folder: int) -> bool:
        """Must the entries of ``folder`` be checked one by one for ``uid``?  Below a
        study folder they share the study's fate, which opendir already checked."""
        if not self.enforced:
            return False
        user = self.user(uid)
        if user is None or user.role != "clinician":
            return False
        if folder in (PATIENTS_INO, STUDIES_INO):
            return True
        node = self.index.node(folder)
        return node is not None and (node.parent == PATIENTS_INO or self._in_view(node))

    def _in_view(self, node: Node) -> bool:
        """Is ``node`` a folder of /by-date or /by-modality (whose leaves are study links)?"""
        for _depth in range(4):
            if node.ino in VIEWS:
                return True
            parent = self.index.node(node.parent)
            if parent is None or parent.ino == node.ino:
                return False
            node = parent
        return False

    def conceals_missing(self, uid: int, folder: int) -> bool:
        """Should a name missing from ``folder`` answer EACCES rather than ENOENT?

        Where entries are hidden from ``uid``, a missing name must look like a
        hidden one, or probing names would tell which patients exist.
        """
        if not self.enforced:
            return False
        return self.user(uid) is None or self.filters(uid, folder)

    def _patient_visible(self, user: User, patient_ino: int) -> bool:
        after: bytes | None = None
        state = None
        now = self.clock()
        while True:
            batch = self.index.entries(patient_ino, after, 64)
            if not batch:
                return False
            for node in batch:
                study = self._study(node.ino)
                if study is None:
                    continue
                if state is None:
                    state = self.index.patient_state(study.patient)
                if may_see(user, study.institution, state, now):
                    return True
            after = batch[-1].name

    def _study_visible(self, user: User, study_ino: int) -> bool:
        study = self._study(study_ino)
        if study is None:
            return False
        state = self.index.patient_state(study.patient)
        return may_see(user, study.institution, state, self.clock())

    def _study(self, study_ino: int) -> Study | None:
        """Patient, UID and institution of a study folder, from the first instance below it."""
        if study_ino in self._studies:
            return self._studies[study_ino]
        manifest = self.index.first_manifest(study_ino)
        if manifest is None:
            return None  # an empty folder: nothing to show, and not remembered
        inst = manifest.instance
        study = Study(inst.patient_key, inst.study_uid, manifest.institution)
        self._remember(self._studies, study_ino, study)
        return study

    def _place(self, node: Node) -> _Place:
        if node.ino in self._places:
            return self._places[node.ino]
        if node.kind == LINK:  # under /studies or a view
            place = self._link_place(node)
        else:
            # Walk up to /patients: the last two folders passed are the study and patient.
            chain = [node.ino]
            current: Node | None = node
            while current is not None and current.parent not in (PATIENTS_INO, current.ino):
                current = self.index.node(current.parent)
                if current is not None:
                    chain.append(current.ino)
            if current is None or current.parent != PATIENTS_INO:
                place = _NOWHERE
            else:
                place = _Place(chain[-1], chain[-2] if len(chain) >= 2 else None)
        self._remember(self._places, node.ino, place)
        return place

    def _link_place(self, link: Node) -> _Place:
        # The target is "../patients/<patient>/<study>" (or with more "../" in the
        # views), as index.commit writes it.
        parts = link.target.split(b"/")
        while parts[:1] == [b".."] and parts[1:2] == [b".."]:
            parts = parts[1:]
        if len(parts) != 4 or parts[:2] != [b"..", b"patients"]:
            return _NOWHERE
        patient = self.index.lookup(PATIENTS_INO, parts[2])
        study = self.index.lookup(patient.ino, parts[3]) if patient is not None else None
        if patient is None or study is None:
            return _NOWHERE
        return _Place(patient.ino, study.ino)

    @staticmethod
    def _remember(memo: dict[int, _T], key: int, value: _T) -> None:
        if len(memo) >= _MEMO_MAX:
            memo.clear()
        memo[key] = value
