"""The pure part of lease observation: frames, lease files and the kernel filter, on synthetic
input (the filter runs on a Unix socket pair, which needs no root)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from roost.host.observe import (
    Sighting,
    attach_filter,
    bpf_program,
    mac_bytes,
    parse_frame,
    read_leases,
)

GUEST = "02:ab:cd:ef:01:23"
GUEST_RAW = bytes.fromhex("02abcdef0123")
OTHER = bytes.fromhex("02aaaaaaaaaa")
SERVER = bytes.fromhex("fe0000000001")
BROADCAST = b"\xff" * 6
NOW = 1_800_000_000


def ip4(text: str) -> bytes:
    return socket.inet_aton(text)


def ether(src: bytes, ethertype: int, payload: bytes, dst: bytes = BROADCAST) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def vlan(frame: bytes, vid: int = 10) -> bytes:
    return frame[:12] + struct.pack("!HH", 0x8100, vid) + frame[12:]


def arp(op: int, sha: bytes, spa: str, tpa: str, htype: int = 1) -> bytes:
    return struct.pack("!HHBBH", htype, 0x0800, 6, 4, op) + sha + ip4(spa) + b"\0" * 6 + ip4(tpa)


def ipv4(src: str, dst: str, proto: int, payload: bytes, fragment: int = 0) -> bytes:
    total = 20 + len(payload)
    header = struct.pack("!BBHHHBBH", 0x45, 0, total, 1, fragment, 64, proto, 0)
    return header + ip4(src) + ip4(dst) + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def bootp(op: int, chaddr: bytes, yiaddr: str, options: bytes) -> bytes:
    fixed = struct.pack("!BBBBIHH", op, 1, 6, 0, 0x1234, 0, 0)
    addresses = ip4("0.0.0.0") + ip4(yiaddr) + ip4("10.77.0.1") + ip4("0.0.0.0")
    body = fixed + addresses + chaddr.ljust(16, b"\0") + b"\0" * 192
    return body + b"\x63\x82\x53\x63" + options


def dhcp(
    kind: int, chaddr: bytes = GUEST_RAW, yiaddr: str = "10.77.0.120", extra: bytes = b""
) -> bytes:
    """A server → client reply of message type `kind` (2 offer, 5 ack, 6 nak)."""
    options = extra + bytes([53, 1, kind, 54, 4]) + ip4("10.77.0.1") + b"\xff"
    message = bootp(2, chaddr, yiaddr, options)
    return ether(SERVER, 0x0800, ipv4("10.77.0.1", "255.255.255.255", 17, udp(67, 68, message)))


ACK = dhcp(5)
GRATUITOUS = ether(GUEST_RAW, 0x0806, arp(1, GUEST_RAW, "10.77.0.120", "10.77.0.120"))
PING = ether(
    GUEST_RAW, 0x0800, ipv4("10.77.0.120", "10.77.0.1", 1, b"\x08\0" + b"\0" * 6), dst=SERVER
)


# -- frames --------------------------------------------------------------------------------


def test_a_dhcpack_for_the_guest_gives_its_yiaddr_whichever_way_it_travels() -> None:
    assert parse_frame(ACK, GUEST) == Sighting("10.77.0.120", "dhcp")
    assert parse_frame(ACK, GUEST_RAW, from_guest=False) == Sighting("10.77.0.120", "dhcp")
    assert parse_frame(ACK, GUEST.upper()) == Sighting("10.77.0.120", "dhcp")


def test_the_message_type_is_found_among_other_options() -> None:
    padded = dhcp(5, extra=b"\0\0" + bytes([1, 4]) + ip4("255.255.255.0") + bytes([12, 0]))
    assert parse_frame(padded, GUEST) == Sighting("10.77.0.120", "dhcp")


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(dhcp(2), id="offer"),
        pytest.param(dhcp(6, yiaddr="0.0.0.0"), id="nak"),
        pytest.param(dhcp(6), id="nak-with-yiaddr"),
        pytest.param(dhcp(5, chaddr=OTHER), id="ack-for-another-mac"),
        pytest.param(dhcp(5, yiaddr="0.0.0.0"), id="ack-to-inform"),
        pytest.param(dhcp(5, yiaddr="224.0.0.1"), id="ack-with-multicast"),
        pytest.param(dhcp(5, extra=b"\xff"), id="end-before-type"),
        pytest.param(ACK.replace(bytes([53, 1, 5]), b"\0\0\0"), id="no-type"),
        pytest.param(ACK.replace(b"\x63\x82\x53\x63", b"\x63\x82\x53\x64"), id="bad-cookie"),
        pytest.param(vlan(ACK), id="vlan-tagged"),
        pytest.param(
            ether(
                GUEST_RAW,
                0x0800,
                ipv4("0.0.0.0", "255.255.255.255", 17, udp(68, 67, ACK[42:])),
            ),
            id="client-to-server",
        ),
        pytest.param(
            ether(SERVER, 0x0800, ipv4("10.77.0.1", "10.77.0.120", 17, ACK[34:], fragment=0x2000)),
            id="fragment",
        ),
    ],
)
def test_no_address_from_other_dhcp_traffic(frame: bytes) -> None:
    assert parse_frame(frame, GUEST) is None


def test_a_release_from_the_guest_gives_no_address_not_even_as_a_hint() -> None:
    message = bootp(1, GUEST_RAW, "0.0.0.0", bytes([53, 1, 7, 255]))
    frame = ether(GUEST_RAW, 0x0800, ipv4("10.77.0.120", "10.77.0.1", 17, udp(68, 67, message)))
    assert parse_frame(frame, GUEST) is None


@pytest.mark.parametrize("op", [1, 2])
def test_arp_sent_by_the_guest_gives_its_sender_address(op: int) -> None:
    frame = ether(GUEST_RAW, 0x0806, arp(op, GUEST_RAW, "10.77.0.121", "10.77.0.1"))
    assert parse_frame(frame, GUEST) == Sighting("10.77.0.121", "arp")
    assert parse_frame(GRATUITOUS, GUEST) == Sighting("10.77.0.120", "arp")


@pytest.mark.parametrize(
    ("frame", "from_guest"),
    [
        pytest.param(
            ether(GUEST_RAW, 0x0806, arp(1, GUEST_RAW, "0.0.0.0", "10.77.0.120")), True, id="probe"
        ),
        pytest.param(
            ether(OTHER, 0x0806, arp(1, OTHER, "10.77.0.5", "10.77.0.120")), True, id="someone-else"
        ),
        pytest.param(
            ether(OTHER, 0x0806, arp(2, GUEST_RAW, "10.77.0.5", "10.77.0.1")), True, id="forged-sha"
        ),
        pytest.param(
            ether(GUEST_RAW, 0x0806, arp(2, OTHER, "10.77.0.5", "10.77.0.1")), True, id="other-sha"
        ),
        pytest.param(GRATUITOUS, False, id="toward-the-guest"),
        pytest.param(
            ether(GUEST_RAW, 0x0806, arp(3, GUEST_RAW, "10.77.0.5", "10.77.0.1")), True, id="rarp"
        ),
        pytest.param(
            ether(GUEST_RAW, 0x0806, arp(1, GUEST_RAW, "10.77.0.5", "10.77.0.1", htype=6)),
            True,
            id="not-ethernet",
        ),
        pytest.param(
            ether(GUEST_RAW, 0x0806, arp(1, GUEST_RAW, "127.0.0.1", "10.77.0.1")), True, id="lo"
        ),
        pytest.param(vlan(GRATUITOUS), True, id="vlan-tagged"),
        pytest.param(vlan(GRATUITOUS).replace(b"\x81\x00", b"\x88\xa8", 1), True, id="qinq"),
    ],
)
def test_no_address_from_other_arp(frame: bytes, from_guest: bool) -> None:
    assert parse_frame(frame, GUEST, from_guest=from_guest) is None


def test_an_ipv4_packet_from_the_guest_hints_at_its_source_address() -> None:
    assert parse_frame(PING, GUEST) == Sighting("10.77.0.120", "ipv4")
    assert parse_frame(PING + b"\0" * 20, GUEST) == Sighting("10.77.0.120", "ipv4")  # padding
    assert parse_frame(PING[:34], GUEST) == Sighting("10.77.0.120", "ipv4")  # headers only


@pytest.mark.parametrize(
    ("frame", "from_guest"),
    [
        pytest.param(PING, False, id="toward-the-guest"),
        pytest.param(PING[:6] + OTHER + PING[12:], True, id="another-mac"),
        pytest.param(PING.replace(ip4("10.77.0.120"), ip4("0.0.0.0")), True, id="unspecified"),
        pytest.param(PING.replace(ip4("10.77.0.120"), ip4("239.1.1.1")), True, id="multicast"),
        pytest.param(PING.replace(ip4("10.77.0.120"), ip4("255.255.255.255")), True, id="bcast"),
        pytest.param(PING[:14] + b"\x65" + PING[15:], True, id="ipv6-version"),
        pytest.param(PING[:14] + b"\x44" + PING[15:], True, id="short-header"),
        pytest.param(ether(GUEST_RAW, 0x86DD, b"\x60" + b"\0" * 39), True, id="ipv6"),
        pytest.param(vlan(PING), True, id="vlan-tagged"),
    ],
)
def test_no_hint_from_other_ipv4(frame: bytes, from_guest: bool) -> None:
    assert parse_frame(frame, GUEST, from_guest=from_guest) is None


@pytest.mark.parametrize("frame", [ACK, GRATUITOUS, PING], ids=["ack", "arp", "ipv4"])
def test_every_truncation_is_survived(frame: bytes) -> None:
    whole = parse_frame(frame, GUEST)
    for end in range(len(frame)):
        assert parse_frame(frame[:end], GUEST) in (None, whole)
    assert parse_frame(ACK[:-10], GUEST) is None  # the UDP length no longer fits


@given(st.binary(max_size=600))
def test_garbage_never_raises(frame: bytes) -> None:
    parse_frame(frame, GUEST)
    parse_frame(frame, GUEST, from_guest=False)


@given(
    st.sampled_from([ACK, GRATUITOUS, PING]),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=8),
)
def test_corrupted_frames_never_raise(frame: bytes, changes: list[tuple[int, int]]) -> None:
    data = bytearray(frame)
    for at, value in changes:
        data[at % len(data)] = value
    result = parse_frame(bytes(data), GUEST)
    assert result is None or isinstance(result, Sighting)


def test_mac_spellings() -> None:
    assert mac_bytes("02:AB:cd:ef:01:23") == GUEST_RAW
    assert mac_bytes("02-ab-cd-ef-01-23") == GUEST_RAW
    assert mac_bytes("2:ab:cd:ef:1:23") == GUEST_RAW
    for bad in ["", "02:ab:cd:ef:01", "02:ab:cd:ef:01:23:45", "zz:ab:cd:ef:01:23", "02abcdef0123"]:
        with pytest.raises(ValueError, match="not a MAC"):
            mac_bytes(bad)


# -- lease files ---------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "leases"
    path.write_text(text)
    return path


def test_dnsmasq_leases_pick_the_latest_unexpired_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"{NOW + 100} 02:ab:cd:ef:01:23 10.77.0.101 guest *\n"
        f"{NOW + 900} 02:AB:CD:EF:01:23 10.77.0.102 guest 01:02:ab:cd:ef:01:23\n"
        f"{NOW + 500} 02:ab:cd:ef:01:23 10.77.0.103 * *\n"
        f"{NOW - 1} 02:aa:aa:aa:aa:aa 10.77.0.104 old *\n"
        f"0 02:bb:bb:bb:bb:bb 10.77.0.105 forever *\n"
        f"{NOW + 9999} 02:bb:bb:bb:bb:bb 10.77.0.106 later *\n"
        "3600 02:cc:cc:cc:cc:cc 10.77.0.107 broken-rtc *\n"
        "duid 00:01:00:01:2c:aa:bb:cc:02:ab:cd:ef:01:23\n"
        f"{NOW + 50} 12345678 fd00::5 guest 00:01:00:01\n"
        "not a lease line at all\n"
        f"{NOW + 50} 02:dd:dd:dd:dd:dd 10.77.0.300 bad-ip *\n"
        f"{NOW + 50} 02:dd:dd:dd:dd:dd 10.77.0.108 too many fields *\n",
    )
    assert read_leases(path, now=NOW) == {
        "02:ab:cd:ef:01:23": "10.77.0.102",
        "02:bb:bb:bb:bb:bb": "10.77.0.105",
        "02:cc:cc:cc:cc:cc": "10.77.0.107",
    }


def read_lease_file(path: Path, mac: str) -> str | None:
    return read_leases(path).get(mac.lower())


def test_read_lease_file_for_one_mac(tmp_path: Path) -> None:
    path = write(tmp_path, "0 02:ab:cd:ef:01:23 10.77.0.101 guest *\n")
    assert read_lease_file(path, "02:AB:CD:EF:01:23") == "10.77.0.101"
    assert read_lease_file(path, "02:ab:cd:ef:01:24") is None
    assert read_lease_file(tmp_path / "missing", GUEST) is None
    assert read_lease_file(tmp_path, GUEST) is None  # a directory: unreadable, not an error


def test_a_half_written_dnsmasq_file_yields_only_whole_lines(tmp_path: Path) -> None:
    line = "0 02:ab:cd:ef:01:23 10.77.0.123 guest *\n"
    for end in range(len(line)):
        assert read_lease_file(write(tmp_path, line[:end]), GUEST) is None
    assert read_lease_file(write(tmp_path, line), GUEST) == "10.77.0.123"
    assert read_leases(write(tmp_path, "\0\xff garbage\n\n"), now=NOW) == {}


ISC = """\
# The format of this file is documented in the dhcpd.leases(5) manual page.
authoring-byte-order little-endian;

lease 10.77.0.50 {
  starts 1 2027/01/11 08:00:00;
  ends 1 2027/01/11 20:00:00;
  binding state active;
  next binding state free;
  rewind binding state free;
  hardware ethernet 02:ab:cd:ef:01:23;
  client-hostname "a {tricky} name";
}
lease 10.77.0.51 {
  starts 1 2027/01/11 09:00:00;
  ends never;
  binding state active;
  hardware ethernet 2:ab:cd:ef:1:23;
}
lease 10.77.0.60 {
  ends epoch 1800000100; # some time
  binding state active;
  hardware ethernet 02:bb:bb:bb:bb:bb;
}
lease 10.77.0.61 {
  ends 1 2027/01/11 07:00:00;
  binding state active;
  hardware ethernet 02:cc:cc:cc:cc:cc;
}
lease 10.77.0.62 {
  binding state active;
  hardware ethernet 02:dd:dd:dd:dd:dd;
}
lease 10.77.0.62 {
  binding state free;
  hardware ethernet 02:dd:dd:dd:dd:dd;
}
lease 10.77.0.70 {
  binding state active;
  hardware ethernet 02:ee:ee:ee:ee:ee;
"""


def test_isc_dhcpd_leases(tmp_path: Path) -> None:
    now = 1_800_000_000  # 2027-01-15 08:00 UTC: the 2027-01-11 ends are past
    assert read_leases(write(tmp_path, ISC), now=now) == {
        "02:ab:cd:ef:01:23": "10.77.0.51",  # written last; .50 has ended anyway
        "02:bb:bb:bb:bb:bb": "10.77.0.60",
    }
    earlier = 1_799_652_600  # 2027-01-11 07:30 UTC: .61 has ended, .50 has not
    assert read_leases(write(tmp_path, ISC), now=earlier) == {
        "02:ab:cd:ef:01:23": "10.77.0.51",
        "02:bb:bb:bb:bb:bb": "10.77.0.60",
    }
    only_first = ISC.split("lease 10.77.0.51", maxsplit=1)[0]
    assert read_leases(write(tmp_path, only_first), now=earlier) == {
        "02:ab:cd:ef:01:23": "10.77.0.50"
    }


# -- the kernel filter ---------------------------------------------------------------------


def filtered(frames: list[bytes], *, seeking: bool) -> list[bytes]:
    """What a socket with the filter lets through (a Unix datagram pair: its frames are all
    `PACKET_HOST` and untagged as far as the filter can tell)."""
    receiver, sender = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with receiver, sender:
        attach_filter(receiver, bpf_program(GUEST_RAW, seeking=seeking))
        receiver.setblocking(False)
        for frame in frames:
            sender.send(frame)
        passed = []
        while True:
            try:
                passed.append(receiver.recv(65536))
            except BlockingIOError:
                return passed


NOISE = [
    ether(OTHER, 0x0806, arp(1, OTHER, "10.77.0.5", "10.77.0.1")),
    PING[:6] + OTHER + PING[12:],
    ether(GUEST_RAW, 0x86DD, b"\x60" + b"\0" * 39),
    vlan(GRATUITOUS),
    ether(SERVER, 0x0800, ipv4("10.77.0.1", "10.77.0.120", 17, udp(53, 68, b"x" * 300))),
    ether(SERVER, 0x0800, ipv4("10.77.0.1", "10.77.0.120", 17, ACK[34:], fragment=0x2000)),
]


def test_the_filter_passes_what_may_matter_while_seeking() -> None:
    big = PING[:16] + struct.pack("!H", 1000) + PING[18:] + b"\0" * 966
    passed = filtered([*NOISE, ACK, GRATUITOUS, big], seeking=True)
    assert passed == [ACK, GRATUITOUS, big[:128]]  # whole replies, only the headers of the rest


def test_the_filter_drops_the_guests_ipv4_once_its_address_is_known() -> None:
    assert filtered([*NOISE, PING, ACK, GRATUITOUS], seeking=False) == [ACK, GRATUITOUS]
