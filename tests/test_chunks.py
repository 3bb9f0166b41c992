"""The stored form of a chunk: the shuffle filter for pixel samples, and what reads it back."""

from __future__ import annotations

import hashlib
import shutil
import struct
from pathlib import Path

import pydicom
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from animfs import chunks, keys
from animfs.chunks import CorruptChunk
from animfs.dicom import read_header_and_width, sample_width
from animfs.index import Index
from animfs.manifest import instance_key
from animfs.store.local import LocalStore

import gen_dicom
from conftest import Archive, files_under, sha256_file

FILTER = bytes.fromhex("5a2a4d18" "01000000")  # zstd skippable frame 0x184D2A5A, 1-byte payload


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from(chunks.SHUFFLE_WIDTHS))
def test_unshuffle_inverts_shuffle_for_any_length(data: bytes, width: int) -> None:
    regrouped = chunks.shuffled(data, width)
    assert len(regrouped) == len(data)
    assert chunks.unshuffled(regrouped, width) == data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.sampled_from(chunks.SHUFFLE_WIDTHS))
def test_unshuffle_into_a_buffer_writes_the_same_bytes_and_no_more(data: bytes, width: int) -> None:
    out = bytearray(b"\xee" * (len(data) + 16))
    chunks.unshuffle_into(chunks.shuffled(data, width), width, memoryview(out))
    assert out == data + b"\xee" * 16


def test_shuffle_regroups_bytes_by_their_place_in_a_sample() -> None:
    assert chunks.shuffled(b"aAbBcCd", 2) == b"abcABCd"  # the odd byte out stays last
    assert chunks.shuffled(b"0123456789", 4) == b"04152637" + b"89"
    assert chunks.unshuffled(b"abcABCd", 2) == b"aAbBcCd"


@pytest.mark.parametrize("width", chunks.SHUFFLE_WIDTHS)
@pytest.mark.parametrize("sealed", [False, True], ids=["plain", "sealed"])
def test_a_shuffled_chunk_reads_back_checked_and_keeps_its_id(width: int, sealed: bool) -> None:
    ring = keys.new_ring() if sealed else None
    plain = bytes(range(256)) * 1000 + b"tail"
    id_plain, stored_plain = chunks.seal(plain, ring)
    id_, stored = chunks.seal(plain, ring, shuffle=width)
    assert id_ == id_plain  # named by content, however it is stored
    frame = chunks.opened(id_, stored, ring)
    assert frame[:9] == FILTER + bytes([width])
    assert chunks.content_size(frame) == len(plain)
    for rehash in (True, False):
        assert chunks.unseal(id_, stored, len(plain), ring, rehash=rehash) == plain
        for copy in (stored, stored_plain):  # into a buffer, as the mount's unpackers read
            out = bytearray(len(plain) + 8)
            chunks.unseal_into(id_, copy, len(plain), memoryview(out), ring, rehash=rehash)
            assert out == plain + bytes(8)
    assert chunks.unseal(id_plain, stored_plain, len(plain), ring) == plain  # older chunks too
    damaged = bytearray(stored)
    damaged[len(damaged) // 2] ^= 1
    for copy in (bytes(damaged), stored[:-1]):
        with pytest.raises(CorruptChunk):
            chunks.unseal_into(id_, copy, len(plain), memoryview(bytearray(len(plain))), ring)


def test_a_shuffled_chunk_under_a_wrong_name_is_refused() -> None:
    plain = bytes(range(256)) * 64
    _, stored = chunks.seal(plain, shuffle=2)
    other = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(CorruptChunk, match="does not match its id"):
        chunks.unseal(other, stored, len(plain))


def test_an_unknown_filter_is_refused_not_guessed() -> None:
    plain = bytes(range(256)) * 64
    id_, stored = chunks.seal(plain, shuffle=2)
    for bad in (stored[:8] + b"\x03" + stored[9:],  # width 3
                FILTER[:4] + struct.pack("<I", 2) + b"\x02\x02" + stored[9:]):  # 2-byte payload
        with pytest.raises(CorruptChunk, match="does not decompress"):
            chunks.unseal(id_, bad, len(plain))
    with pytest.raises(ValueError):
        chunks.seal(plain, shuffle=3)


def test_a_reader_that_predates_the_filter_cannot_serve_shuffled_bytes() -> None:
    """Such a reader decompresses one zstd frame: the empty skippable one.  Its size
    check then refuses the chunk rather than serving bytes in the wrong order."""
    plain = bytes(range(256)) * 64
    _, stored = chunks.seal(plain, shuffle=2)
    try:
        out = zstandard.ZstdDecompressor().decompress(stored, max_output_size=len(plain))
    except zstandard.ZstdError:
        out = b""
    assert out != plain and len(out) != len(plain)


@pytest.mark.parametrize(
    ("name", "width"),
    [
        ("CT_small.dcm", 2),  # 16-bit, explicit little endian
        ("MR_small_implicit.dcm", 2),  # 16-bit, implicit little endian
        ("MR_small_bigendian.dcm", 2),  # 16-bit, big endian: still two byte planes
        ("rtdose.dcm", 4),  # 32-bit dose grid
        ("SC_rgb_small_odd.dcm", 0),  # 8-bit
        ("liver_1frame.dcm", 0),  # 1-bit segmentation
        ("MR_small_jpeg_ls_lossless.dcm", 0),  # 16-bit, but JPEG-LS compressed
        ("MR_small_RLE.dcm", 0),  # 16-bit, RLE compressed
        ("image_dfl.dcm", 0),  # deflated as a whole
    ],
)
def test_the_shuffle_width_follows_the_pixels(name: str, width: int) -> None:
    path = get_testdata_file(name)
    assert path is not None, name  # bundled with pydicom: nothing is downloaded
    assert sample_width(pydicom.dcmread(path, stop_before_pixels=True)) == width
    if name != "image_dfl.dcm":  # which has no PatientID
        with open(path, "rb") as f:
            assert read_header_and_width(f, issuer_default="X")[1] == width


def test_ingest_shuffles_plain_16_bit_pixels_only_and_reads_back_identical(
    archive: Archive, tmp_path: Path
) -> None:
    src = tmp_path / "in"
    gen_dicom.write_series(src / "ct", patient_id="SHUF", patient_name="Shuffle^Test",
                           n_slices=6, rows=256, cols=256, modality="CT",
                           study_description="CT", series_description="Axial",
                           institution_name="CHL", seed=3)
    for name in ("rtdose.dcm", "SC_rgb_small_odd.dcm", "MR_small_RLE.dcm"):
        shutil.copyfile(get_testdata_file(name), src / name)  # type: ignore[arg-type]
    originals = files_under(src)
    expected = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in originals}
    archive.ingest(src)

    ring = keys.load(archive.dir / "animfs.key")
    index = Index(archive.dir / "index")
    try:
        manifests = {sop: index.manifest(instance_key(sop)) for sop in expected}
    finally:
        index.close()
    widths = {}
    for sop, manifest in manifests.items():
        assert manifest is not None
        for ref in manifest.chunks:
            for site in ("site-a", "site-b"):
                stored = LocalStore(site, archive.dir / site).get(chunks.chunk_key(ref.id))
                frame = chunks.opened(ref.id, stored, ring)
                widths[expected[sop].name] = frame[8] if frame[:8] == FILTER else 0
                assert chunks.unseal(ref.id, stored, ref.size, ring) is not None
    assert widths.pop("rtdose.dcm") == 4
    assert widths.pop("SC_rgb_small_odd.dcm") == 0
    assert widths.pop("MR_small_RLE.dcm") == 0
    assert set(widths.values()) == {2}  # the generated CT slices

    with archive.mounted() as m:
        served = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p
                  for p in files_under(m / "patients")}
        assert served.keys() == expected.keys()
        for sop, path in expected.items():
            assert sha256_file(served[sop]) == sha256_file(path), path
    verify = archive.run("verify", "--deep")
    assert verify.returncode == 0, verify.stdout + verify.stderr
