"""The unpacker processes' reply records (animfs.unpack), read back however the pipe
splits them: a read may end anywhere in a record or in a reason that follows it.
The processes themselves are tested through a mount in test_cache.py."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from animfs import unpack
from animfs.chunks import CHUNK_SIZE

slots = st.integers(0, unpack.SLOTS - 1)
replies = st.lists(
    st.one_of(
        st.tuples(slots, st.just(unpack.OK), st.integers(0, CHUNK_SIZE), st.just(b"")),
        st.tuples(slots, st.sampled_from([unpack.MISSING, unpack.READY]), st.just(0),
                  st.just(b"")),
        st.tuples(slots, st.sampled_from([unpack.DAMAGED, unpack.UNREADABLE, unpack.FETCH_FAILED]),
                  st.just(0), st.binary(max_size=300)),
        # fetched and in the slot, but not written to the disk cache: a length and a reason
        st.tuples(slots, st.just(unpack.NOT_KEPT), st.integers(0, CHUNK_SIZE),
                  st.binary(max_size=300)),
    ),
    max_size=30,
)


@given(replies, st.lists(st.integers(1, 64), max_size=40))
def test_replies_come_back_whole_and_in_order_whatever_the_reads(
    sent: list[tuple[int, int, int, bytes]], reads: list[int]
) -> None:
    stream = b"".join(unpack.reply(*record) for record in sent)
    pending, got, at = bytearray(), [], 0
    for size in [*reads, len(stream)]:  # the last read takes what is left
        pending += stream[at : at + size]
        at += size
        while (record := unpack.next_reply(pending)) is not None:
            got.append(record)
    assert got == sent
    assert pending == b""


def test_a_reason_longer_than_what_has_arrived_waits_for_the_rest() -> None:
    record = unpack.reply(1, unpack.DAMAGED, reason=b"chunk 0123: does not decompress")
    pending = bytearray(record[:-1])
    assert unpack.next_reply(pending) is None
    assert pending == record[:-1]  # nothing taken
    pending += record[-1:]
    assert unpack.next_reply(pending) == (1, unpack.DAMAGED, 0, b"chunk 0123: does not decompress")
    assert pending == b""
