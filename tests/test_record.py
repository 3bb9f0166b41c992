"""The compact index records (animfs.record) and the synthetic index generator."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gen_index
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from animfs import listing, record
from animfs.chunks import ChunkRef
from animfs.dicom import Instance
from animfs.index import Index, check
from animfs.manifest import Manifest, Placement

text = st.text(max_size=40)
hexes = st.binary(min_size=32, max_size=32).map(bytes.hex)
numbers = st.none() | st.integers(min_value=-(2**70), max_value=2**70)
inos = st.integers(min_value=1 << 16, max_value=(1 << 63) - 1)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    inst = Instance(
        **{
            f.name: draw(numbers if f.name in ("series_number", "instance_number") else text)
            for f in dataclasses.fields(Instance)
        }
    )
    names = [draw(text) for _ in range(5)]
    if draw(st.booleans()):
        names[3] = record.default_file_name(inst)
    placement = Placement(
        names[0], names[1], names[2], names[3], *[draw(inos) for _ in range(4)],
        link_name=names[4], link_ino=draw(inos),
    )
    chunks = draw(st.lists(st.tuples(hexes, st.integers(0, 2**40), st.integers(0, 2**40)),
                           max_size=4))
    return Manifest(
        instance=inst,
        institution=draw(text),
        size=draw(st.integers(0, 2**50)),
        sha256=draw(hexes | st.just("not-hex")),
        chunks=tuple(ChunkRef(*c) for c in chunks),
        ingested_ns=draw(st.integers(0, 2**63 - 1)),
        placement=placement,
        keyed=draw(st.booleans()),
    )


@settings(max_examples=300, deadline=None)
@given(manifests(), manifests())
def test_round_trip_against_own_and_other_series_record(m: Manifest, other: Manifest) -> None:
    own = record.encode_series(m)
    data = record.encode_instance(m, own)
    back = record.decode(data, lambda ino: own)
    assert back == m
    assert back.to_bytes() == m.to_bytes()
    # Against another instance's series record (same inodes): what differs is kept.
    p = dataclasses.replace(
        other.placement, **{n: getattr(m.placement, n) for n in record._INOS}
    )
    base = record.encode_series(other.with_placement(p))
    data = record.encode_instance(m, base)
    assert record.decode(data, lambda ino: base) == m


@settings(max_examples=300, deadline=None)
@given(manifests())
def test_peek_reads_what_decode_reads(m: Manifest) -> None:
    data = record.encode_instance(m)  # compact, or JSON where it does not fit
    p = m.placement
    assert record.peek(data) == (
        p.file_ino, p.series_ino, m.ingested_ns, m.size, p.file_name, m.instance.sop_uid
    )
    assert record.peek(m.to_bytes())[4] == p.file_name


@settings(max_examples=300, deadline=None)
@given(manifests())
def test_chunk_refs_reads_what_decode_reads(m: Manifest) -> None:
    data = record.encode_instance(m)  # compact, or JSON where it does not fit
    assert record.chunk_refs(data) == m.chunks
    assert record.chunk_refs(m.to_bytes()) == m.chunks
    if data[:1] == b"{":
        return
    cuts = [data[: record._HEAD.size], data[:1]]  # a record cut short is refused
    if m.chunks and not data[1] & (record.NAMED | record.OVERRIDES):
        cuts.append(data[:-1])  # ... in its last chunk (nothing follows the chunks)
    for cut in cuts:
        with pytest.raises(ValueError):
            record.chunk_refs(cut)


def test_typical_record_is_small() -> None:
    for seed in range(1, 6):
        m = next(gen_index.instances(1, seed=seed, start_ns=10**18))
        data = record.encode_instance(m)  # about 100 bytes and 40 per chunk
        assert data[0] == record.TAG and len(data) <= 110 + 40 * len(m.chunks), len(data)
    assert len(m.to_bytes()) > 1000
    assert record.decode(data, lambda ino: record.encode_series(m)) == m


def test_json_records_of_a_format_1_index_still_decode() -> None:
    m = next(gen_index.instances(1, seed=3, start_ns=10**18))
    assert record.decode(m.to_bytes(), lambda ino: None) == m
    odd = dataclasses.replace(m, sha256="x" * 64)  # does not fit the compact form
    assert record.encode_instance(odd)[:1] == b"{"


def test_generator_fills_a_consistent_index(tmp_path: Path) -> None:
    index = Index(tmp_path / "idx", map_size=1 << 30)
    try:
        gen_index.fill(index, 2_000, seed=5, batch=700)
        gen_index.fill(index, 500, seed=6)  # a second run adds other patients
        counts = index.counts()
        assert counts["instances"] == 2_500
        assert check(index) == []
        listed = list(index.all_manifests())
        assert len(listed) == 2_500
        assert len({m.instance.sop_uid for m in listed}) == 2_500
        patients = {m.instance.patient_key for m in listed}
        assert counts["patients"] == len(patients) > 3
        first = listed[0]
        assert index.manifest(first.key) == first
        node = index.lookup(first.placement.series_ino, first.placement.file_name.encode())
        assert node is not None and node.ino == first.placement.file_ino
        assert node.size == first.size
    finally:
        index.close()
    again = Index(tmp_path / "idx", map_size=1 << 30)  # deterministic per seed
    try:
        m = next(gen_index.instances(1, seed=5, start_ns=0))
        assert again.manifest(m.key) is not None
    finally:
        again.close()


def test_a_series_listing_finds_each_file_by_name_inode_and_number() -> None:
    made = list(gen_index.instances(400, seed=8, start_ns=10**18))
    series = [m for m in made if m.placement.series_ino == made[-1].placement.series_ino]
    shared = record.encode_series(series[0])
    files = listing.Listing()
    for number, m in enumerate(reversed(series), 1):  # committed in another order
        files.put(listing.entry_of(number, record.encode_instance(m, shared)))
    renamed = dataclasses.replace(series[0].placement, file_name="zz_renamed.dcm")
    files.put(listing.entry_of(len(series), record.encode_instance(
        series[0].with_placement(renamed), shared)))
    view = listing.View(files.encode())
    names = [e.name for e in view]
    assert len(view) == len(series) > 10 and names == sorted(names)
    assert names[-1] == b"zz_renamed.dcm" and list(view) == list(files)
    for entry in files:
        assert view.find(entry.name) == entry == view.by_ino(entry.ino)
    assert [e.image for e in view.by_image()] == list(range(1, len(series) + 1))
    assert [e.image for e in view.by_image(5)] == list(range(6, len(series) + 1))
    assert [e.name for e in view.after(names[3])] == names[4:]
    assert view.find(b"00001_no-such.dcm") is None and view.by_ino(1) is None
    found = view.find(b"zz_renamed.dcm")
    assert found is not None
    assert record.decode(found.record, lambda ino: shared) == series[0].with_placement(renamed)


def test_kept_listings_are_used_only_while_they_are_what_is_stored() -> None:
    made = list(gen_index.instances(300, seed=9, start_ns=10**18))
    series = [m for m in made if m.placement.series_ino == made[-1].placement.series_ino]
    shared = record.encode_series(series[0])
    files = listing.Listing([listing.entry_of(0, record.encode_instance(m, shared))
                             for m in series[:-1]])
    stored = files.encode()
    cache = listing.Cache(max_files=len(series) * 2 - 2)
    assert cache.known(7, snapshot=1) is False  # never read: must be read
    kept = cache.fill(7, 1, memoryview(stored))
    assert list(kept) == list(files)
    assert cache.known(7, snapshot=1) is kept  # same snapshot: used without a read
    assert cache.known(7, snapshot=2) is False  # something was committed since
    assert cache.read(7, 2, stored) is kept  # ... but not to this listing
    assert cache.known(7, snapshot=2) is kept
    files.put(listing.entry_of(0, record.encode_instance(series[-1], shared)))
    grown = cache.read(7, 3, files.encode())  # this listing changed: the stored one
    assert isinstance(grown, listing.View) and len(grown) == len(series)
    assert cache.known(7, snapshot=3) is False and cache.known(7, snapshot=1) is False
    assert cache.read(8, 3, None) is None  # no listing: remembered for this snapshot only
    assert cache.known(8, snapshot=3) is None and cache.known(8, snapshot=4) is False
    cache.fill(9, 4, stored)
    cache.fill(10, 4, files.encode())  # more files than it may hold: the oldest go
    assert cache.known(9, snapshot=4) is False and cache.known(10, snapshot=4) is not False
    assert len(cache.fill(11, 4, listing.Listing(list(files) * 3).encode())) == len(series) * 3
    assert cache.known(11, snapshot=4) is False  # too big to keep at all


def test_an_index_lists_what_was_committed_since_it_last_listed(tmp_path: Path) -> None:
    made = list(gen_index.instances(600, seed=11, start_ns=10**18))
    last = made[-1].placement
    series = [m for m in made if m.placement.series_ino == last.series_ino]
    assert len(series) > 3
    index = Index(tmp_path / "idx", map_size=1 << 30)
    try:
        index.bulk_add(m for m in made if m not in series[-2:])
        listed = index.entries(last.series_ino, None, 10_000)  # listed whole: kept
        assert [n.ino for n in listed] == [m.placement.file_ino for m in series[:-2]]
        assert index.lookup(last.series_ino, last.file_name.encode()) is None
        index.bulk_add(series[-2:])
        names = [n.name.decode() for n in index.entries(last.series_ino, None, 10_000)]
        assert names == [m.placement.file_name for m in series]
        found = index.lookup(last.series_ino, last.file_name.encode())
        assert found is not None and found.ino == last.file_ino
        assert index.file_manifest(found) == series[-1] == index.manifest(series[-1].key)
        folder = index.node(last.series_ino)
        assert folder is not None and index.file_manifest(folder) is None
        first = min(made, key=lambda m: (m.placement.study_name, m.placement.series_name,
                                         m.placement.file_name)
                    if m.placement.patient_ino == last.patient_ino else ("\uffff",))
        assert index.first_manifest(last.patient_ino) == first
        assert index.first_manifest(1 << 40) is None
    finally:
        index.close()
