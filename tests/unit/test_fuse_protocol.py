"""The FUSE wire format and node ids: layouts, round trips, alignment, bad input. No /dev/fuse."""

from __future__ import annotations

import struct

import pytest

from cacheagent.fuse import nodes
from cacheagent.fuse.nodes import NodeClashError, NodeRef, NodeTable, node_id
from cacheagent.fuse.protocol import (
    DT_DIR,
    DT_REG,
    IN_HEADER,
    OUT_HEADER,
    ROOT_ID,
    Attr,
    Dirent,
    InitOut,
    Notify,
    Opcode,
    ProtocolError,
    StatFs,
    decode_init,
    decode_name,
    decode_read,
    decode_release,
    decode_request,
    dirent_size,
    encode_attr,
    encode_attr_out,
    encode_dirents,
    encode_entry,
    encode_init_out,
    encode_notify,
    encode_open,
    encode_reply,
    encode_statfs,
)


def test_struct_sizes_match_linux_fuse_h() -> None:
    assert IN_HEADER.size == 40
    assert OUT_HEADER.size == 16
    attr = Attr(ino=5, mode=0o100444, nlink=1, size=1000, time_ns=1_500_000_000)
    assert len(encode_attr(attr)) == 88
    assert len(encode_entry(5, attr, entry_ttl=1, attr_ttl=1)) == 128
    assert len(encode_attr_out(attr, 1.0)) == 104
    assert len(encode_open(1, 2)) == 16
    assert len(encode_statfs(StatFs(1, 2, 4096, 255))) == 80
    init = InitOut(40, 131072, 1, 64, 48, 4096, 256)
    assert len(encode_init_out(init)) == 64


def test_request_round_trip_and_bodies() -> None:
    body = struct.pack("<QQIIQII", 0xABC, 4096, 1 << 20, 0, 0, 0, 0)
    raw = IN_HEADER.pack(40 + len(body), Opcode.READ, 99, 1234, 1, 2, 3, 0, 0) + body
    request = decode_request(raw)
    assert (request.header.opcode, request.header.unique, request.header.nodeid) == (15, 99, 1234)
    read = decode_read(request.body)
    assert (read.fh, read.offset, read.size) == (0xABC, 4096, 1 << 20)
    assert decode_release(struct.pack("<QIIQ", 77, 0, 0, 0)) == 77
    assert decode_name(b"config.json\0") == "config.json"
    init = decode_init(struct.pack("<IIII", 7, 45, 131072, 3) + bytes(48))
    assert (init.major, init.minor, init.max_readahead, init.flags) == (7, 45, 131072, 3)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: decode_request(b"\0" * 39), "shorter than the 40-byte header"),
        (lambda: decode_request(IN_HEADER.pack(50, 1, 1, 1, 0, 0, 0, 0, 0)), "says 50 bytes"),
        (lambda: decode_read(bytes(39)), "fuse_read_in needs 40 bytes"),
        (lambda: decode_init(bytes(8)), "fuse_init_in needs 16 bytes"),
        (lambda: decode_name(b"abc"), "not NUL-terminated"),
    ],
)
def test_bad_input_is_a_precise_protocol_error(call: object, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        call()  # type: ignore[operator]


def test_replies_and_notifications_carry_length_error_and_unique() -> None:
    assert OUT_HEADER.unpack(encode_reply(5, b"abc")[0]) == (19, 0, 5)
    assert OUT_HEADER.unpack(encode_reply(5, error=2)[0]) == (16, -2, 5)
    assert OUT_HEADER.unpack(encode_notify(Notify.RESEND)[0]) == (16, 7, 0)
    ttl = encode_entry(0, None, entry_ttl=1.5, attr_ttl=0)  # a negative entry
    assert struct.unpack_from("<QQQQII", ttl) == (0, 0, 1, 0, 500_000_000, 0)


def test_dirents_are_8_byte_aligned_and_stop_at_the_limit() -> None:
    entries = [Dirent(1, b".", DT_DIR), Dirent(9, b"abcdefghi", DT_REG), Dirent(3, b"x", DT_REG)]
    packed = encode_dirents(entries, first_offset=4, limit=1000)
    assert len(packed) == dirent_size(b".") + dirent_size(b"abcdefghi") + dirent_size(b"x")
    assert dirent_size(b".") == 32 and dirent_size(b"abcdefghi") == 40
    ino, off, namelen, kind = struct.unpack_from("<QQII", packed, 32)
    assert (ino, off, namelen, kind) == (9, 6, 9, DT_REG)  # off: where the next entry starts
    assert packed[56:65] == b"abcdefghi" and packed[65:72] == bytes(7)
    assert len(encode_dirents(entries, 0, limit=71)) == 32  # the second does not fit whole


def test_node_ids_are_stable_63_bit_and_never_the_root() -> None:
    first = node_id("sha256:aa", "weights/a.bin")
    assert first == node_id("sha256:aa", "weights/a.bin")  # the same in any process
    assert first != node_id("sha256:aa", "weights/b.bin")
    assert first != node_id("sha256:bb", "weights/a.bin")
    assert all(ROOT_ID < node_id("m", str(n)) < 1 << 63 for n in range(1000))


def test_node_table_resolves_drops_and_refuses_a_clash(monkeypatch: pytest.MonkeyPatch) -> None:
    table = NodeTable()
    assert table.add_model("m", ["", "a", "d/b"]) == []
    assert table.resolve(node_id("m", "d/b")) == NodeRef("m", "d/b")
    assert table.id_for("m", "a") == node_id("m", "a")
    table.drop_model("m")
    assert table.resolve(node_id("m", "a")) is None and len(table) == 0

    monkeypatch.setattr(nodes, "node_id", lambda model, relpath: 42)  # force a clash
    clashes = table.add_model("m", ["a", "b"])
    assert [clash.nodeid for clash in clashes] == [42]
    assert table.resolve(42) == NodeRef("m", "a")  # the first keeps the id
    with pytest.raises(NodeClashError, match="m/b clashes with m/a"):
        table.id_for("m", "b")
