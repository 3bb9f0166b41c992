"""Pure DICOM handling: a file's header becomes an :class:`Instance`; names are made safe.

Nothing here touches the index or the stores.  Folder names follow DESIGN.md:

    <issuer>-<PatientID>_<Family^Given>/
        <StudyDate>_<Accession|->_<StudyDescription>/
            <SeriesNumber:03d>_<Modality>_<SeriesDescription>/
                <InstanceNumber:05d>_<SOPInstanceUID>.dcm

Text is decoded with the dataset's SpecificCharacterSet (pydicom does that),
NFC-normalised and sanitised by :func:`safe_name`.
"""

from __future__ import annotations

import hashlib
import re
import struct
import threading
import unicodedata
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

NAME_MAX = 255  # bytes, as the kernel counts them
REQUIRED = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# Every element :func:`_instance` reads, and no other: pydicom then seeks over the
# values of the rest instead of reading them (half the cost of a parse, which
# holds the GIL).  An element missing here would read as empty.
HEADER_KEYWORDS = (
    *REQUIRED,
    "IssuerOfPatientID",
    "PatientName",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "SeriesNumber",
    "Modality",
    "SeriesDescription",
    "SOPClassUID",
    "InstanceNumber",
    "InstitutionName",
    "SpecificCharacterSet",
    "StudyID",
    "BitsAllocated",  # for :func:`sample_width`, not the Instance
)
_HEADER_TAGS = [Tag(k) for k in HEADER_KEYWORDS]
# Transfer syntaxes whose pixel data is stored as plain samples ("native"), not
# encapsulated in JPEG, RLE and the like; "" is a file without file meta, which is
# implicit little endian.
NATIVE = {"", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


class NotDicom(Exception):
    """The file cannot be archived; the message says why, in a few words."""


@dataclass(frozen=True)
class Instance:
    """What the archive keeps about one DICOM instance besides its bytes."""

    patient_id: str
    issuer: str
    patient_name: str
    study_uid: str
    study_date: str
    study_time: str
    accession: str
    study_description: str
    series_uid: str
    series_number: int | None
    modality: str
    series_description: str
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None
    institution_name: str
    transfer_syntax: str
    charset: str
    study_id: str = ""  # StudyID (0020,0010): for the DICOMDIR; absent from older manifests

    @property
    def patient_key(self) -> str:
        """How patients are told apart: the four hospitals' PatientIDs collide."""
        return f"{self.issuer}-{self.patient_id}"

    def folder_names(self) -> tuple[str, str, str, str]:
        """The preferred (patient, study, series, file) names, before de-duplication."""
        return (
            safe_name(f"{self.issuer}-{self.patient_id}_{self.patient_name}"),
            safe_name(
                _join(self.study_date or "00000000", self.accession or "-", self.study_description)
            ),
            safe_name(
                _join(
                    f"{self.series_number or 0:03d}", self.modality or "OT", self.series_description
                )
            ),
            safe_name(f"{self.instance_number or 0:05d}_{self.sop_uid}.dcm"),
        )


def _join(*parts: str) -> str:
    return "_".join(p for p in parts if p)


# warnings.catch_warnings() swaps the process's warning filters: two parses in two
# threads (ingest's workers) would restore each other's, and pydicom's warnings about
# damaged input would reach stderr.  A parse holds the GIL anyway: taking turns costs
# little.
_QUIET = threading.Lock()


def read_header(source: BinaryIO, *, issuer_default: str) -> Instance:
    """Parse the header of one DICOM file and check that the file is complete.

    Pixel data is skipped, not read: the elements after the header are walked
    by their declared lengths, so a file cut short anywhere is refused.
    ``issuer_default`` is the ingesting institution, used when the file has no
    IssuerOfPatientID.  Raises :class:`NotDicom` with a short reason.
    """
    return read_header_and_width(source, issuer_default=issuer_default)[0]


def read_header_and_width(source: BinaryIO, *, issuer_default: str) -> tuple[Instance, int]:
    """:func:`read_header`, and the file's :func:`sample_width`."""
    try:
        with _QUIET, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
            instance = _instance(ds, issuer_default)
            width = sample_width(ds)
            implicit, little = ds.original_encoding
            deflated = transfer_syntax_of(ds) == DEFLATED
        if not deflated:
            size = source.seek(0, 2)
            _walk(source, size=size, implicit=bool(implicit), little=bool(little))
        return instance, width
    except InvalidDicomError:
        raise NotDicom("not a DICOM file (no DICM prefix and no readable header)") from None
    except NotDicom:
        raise
    except EOFError:
        raise NotDicom("truncated DICOM file") from None
    except Exception as exc:  # pydicom raises many kinds on damaged input
        raise NotDicom(f"unreadable DICOM header ({type(exc).__name__}: {_short(exc)})") from exc


# Value representations whose explicit-VR header has a 4-byte length.
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


DEFLATED = "1.2.840.10008.1.2.1.99"


def sample_width(ds: Any) -> int:
    """Bytes per pixel sample when the pixels are stored as plain multi-byte samples
    (16-bit CT and MR, 32- and 64-bit float images), else 0.

    It is the width of the shuffle filter ingest asks for (:mod:`animfs.chunks`):
    8-bit and 1-bit pixels gain nothing from it, and encapsulated pixels (JPEG and
    the like) are already compressed.  Deflated files are compressed as a whole.
    """
    bits = _int(ds, "BitsAllocated")
    if bits not in (16, 32, 64) or transfer_syntax_of(ds) not in NATIVE:
        return 0
    return bits // 8


def transfer_syntax_of(ds: Any) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def _walk(f: BinaryIO, *, size: int, implicit: bool, little: bool) -> None:
    """Walk every top-level element of the file by its declared length.

    pydicom quietly accepts a file cut short in its header, and the pixel data
    is not parsed at all: this catches both.  Raises :class:`NotDicom` when a
    declared length runs past the end of the file.  Only element headers are
    read; values are seeked over, so a 600 MB file costs a few reads.
    """
    f.seek(128)
    start = 132 if f.read(4) == b"DICM" else 0
    # The file meta group is always explicit VR little endian.
    pos = _walk_elements(f, start, size, implicit=False, little=True, meta_only=True)
    _walk_elements(f, pos, size, implicit=implicit, little=little, meta_only=False)


def _walk_elements(
    f: BinaryIO, pos: int, size: int, *, implicit: bool, little: bool, meta_only: bool
) -> int:
    order = "<" if little else ">"

    def element(pos: int) -> tuple[int, int, int]:
        """(tag, value offset, value length) of the element at ``pos``."""
        f.seek(pos)
        head = f.read(8)
        if len(head) < 8:
            raise NotDicom(f"truncated DICOM file (element header at byte {pos})")
        group, elem = struct.unpack(order + "HH", head[:4])
        tag = group << 16 | elem
        if implicit or group == 0xFFFE:
            return tag, pos + 8, struct.unpack(order + "I", head[4:])[0]
        vr = head[4:6]
        if vr in _LONG_VRS:
            more = f.read(4)
            if len(more) < 4:
                raise NotDicom(f"truncated DICOM file (element header at byte {pos})")
            return tag, pos + 12, struct.unpack(order + "I", more)[0]
        return tag, pos + 8, struct.unpack(order + "H", head[6:])[0]

    def skip_undefined(pos: int, depth: int) -> int:
        """Skip items until the sequence delimiter; returns the offset after it."""
        if depth > 64:
            raise NotDicom("DICOM sequences nested too deeply")
        while True:
            tag, value, length = element(pos)
            if tag == _SEQ_END:
                return value
            if tag != _ITEM:
                raise NotDicom(f"malformed sequence at byte {pos}")
            pos = skip_value(value, length, depth + 1, item=True)

    def skip_value(value: int, length: int, depth: int, item: bool = False) -> int:
        if length != _UNDEFINED:
            end = value + length
            if end > size:
                raise NotDicom(f"truncated DICOM file (value at byte {value} runs past the end)")
            return end
        if not item:
            return skip_undefined(value, depth)
        pos = value  # an item of undefined length: elements until the item delimiter
        while True:
            tag, inner, inner_length = element(pos)
            if tag == _ITEM_END:
                return inner
            pos = skip_value(inner, inner_length, depth + 1)

    while pos < size:
        if size - pos < 8 and f.seek(pos) == pos and not f.read().strip(b"\x00"):
            return size  # trailing NUL padding some writers add
        if meta_only:
            f.seek(pos)
            if f.read(2) != b"\x02\x00":
                return pos
        tag, value, length = element(pos)
        pos = skip_value(value, length, 0)
    return pos


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:120]


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return unicodedata.normalize("NFC", str(value)).strip().strip("\x00")


def _int(ds: Any, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _instance(ds: Any, issuer_default: str) -> Instance:
    missing = [k for k in REQUIRED if not _text(ds, k)]
    if missing:
        raise NotDicom(f"missing {', '.join(missing)}")
    transfer_syntax = transfer_syntax_of(ds)
    charset = ds.get("SpecificCharacterSet", "")
    if isinstance(charset, pydicom.multival.MultiValue):
        charset = "\\".join(str(c) for c in charset)
    return Instance(
        patient_id=_text(ds, "PatientID"),
        issuer=_text(ds, "IssuerOfPatientID") or issuer_default,
        patient_name=_text(ds, "PatientName"),
        study_uid=_text(ds, "StudyInstanceUID"),
        study_date=_text(ds, "StudyDate"),
        study_time=_text(ds, "StudyTime"),
        accession=_text(ds, "AccessionNumber"),
        study_description=_text(ds, "StudyDescription"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        series_number=_int(ds, "SeriesNumber"),
        modality=_text(ds, "Modality"),
        series_description=_text(ds, "SeriesDescription"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        sop_class_uid=_text(ds, "SOPClassUID"),
        instance_number=_int(ds, "InstanceNumber"),
        institution_name=_text(ds, "InstitutionName"),
        transfer_syntax=transfer_syntax,
        charset=str(charset),
        study_id=_text(ds, "StudyID"),
    )


# Characters that are legal in file names but break shells, terminals or
# legacy viewers: bidi controls can make a name display as something else.
_BIDI = {chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C)}


def safe_name(text: str) -> str:
    """A single path component that every tool can handle.

    NFC-normalised; no ``/``, NUL, control or bidi-control characters; spaces
    become ``_``; never empty, ``.`` or ``..``; at most 255 bytes of UTF-8, cut
    on a character boundary.
    """
    if text.isascii() and text.isprintable() and not _NEEDS_CARE.search(text):
        return text if text.strip(".") and len(text) <= NAME_MAX else _slow_safe_name(text)
    return _slow_safe_name(text)


_NEEDS_CARE = re.compile(r"[\s/\\]")


def _slow_safe_name(text: str) -> str:
    text = unicodedata.normalize("NFC", text)
    out = []
    for ch in text:
        if ch in _BIDI:
            continue
        if ch.isspace() or ch in "/\\":
            ch = "_"
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs"):
            continue
        out.append(ch)
    # Again: a dropped character may have stood between a letter and its accent.
    name = unicodedata.normalize("NFC", "".join(out))
    if name.strip(".") == "":
        name = name.replace(".", "_") or "_"
    return truncate(name, NAME_MAX)


def truncate(name: str, limit: int) -> str:
    """``name`` cut to at most ``limit`` bytes of UTF-8 on a character boundary."""
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return name
    return encoded[:limit].decode("utf-8", "ignore")


def unique_name(name: str, uid: str) -> str:
    """``name`` with a short hash of ``uid`` added, for a name already taken in its folder.

    The hash goes before a ``.dcm`` extension, and the result still fits 255 bytes.
    """
    tag = "~" + hashlib.sha256(uid.encode()).hexdigest()[:8]
    stem, ext = (name[:-4], ".dcm") if name.endswith(".dcm") else (name, "")
    room = NAME_MAX - len(tag.encode()) - len(ext)
    return truncate(stem, room) + tag + ext
