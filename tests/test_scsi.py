"""The SG_IO interface checked against <scsi/sg.h>, sense decoding, and the medium changer's
answers decoded from bytes as SMC-3 lays them out (the changer itself: test_tape_st.py)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from devices import scsi
from devices.tape.changer import ElementKind, _parse_element_status

FIELDS = [name for name, _ in scsi.SgIoHdr._fields_]


@pytest.fixture(scope="module")
def c_view(tmp_path_factory):
    compiler = shutil.which("cc")
    if compiler is None or not os.path.exists("/usr/include/scsi/sg.h"):
        pytest.skip("needs cc and scsi/sg.h (apt-get install gcc libc6-dev)")
    directory = tmp_path_factory.mktemp("sg")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <scsi/sg.h>", "int main(void) {",
             '  printf("SG_IO %lu\\n", (unsigned long)SG_IO);',
             '  printf("SG_DXFER_NONE %d\\nSG_DXFER_TO_DEV %d\\nSG_DXFER_FROM_DEV %d\\n", '
             "SG_DXFER_NONE, SG_DXFER_TO_DEV, SG_DXFER_FROM_DEV);",
             '  printf("SG_INFO_OK_MASK %d\\n", SG_INFO_OK_MASK);',
             '  printf("sizeof %zu\\n", sizeof(sg_io_hdr_t));']
    lines += [f'  printf("{f} %zu\\n", offsetof(sg_io_hdr_t, {f}));' for f in FIELDS]
    lines += ["  return 0;", "}"]
    source, binary = directory / "sg.c", directory / "sg"
    source.write_text("\n".join(lines) + "\n")
    subprocess.run([compiler, "-Wall", "-Werror", "-o", str(binary), str(source)], check=True,
                   capture_output=True, text=True)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    yield {k: int(v) for k, v in (line.split() for line in output.splitlines())}
    shutil.rmtree(directory)


def test_sg_io_header_matches_the_c_header(c_view):
    assert scsi.SG_IO == c_view["SG_IO"]
    for name in ("SG_DXFER_NONE", "SG_DXFER_TO_DEV", "SG_DXFER_FROM_DEV", "SG_INFO_OK_MASK"):
        assert getattr(scsi, name) == c_view[name], name
    assert ctypes.sizeof(scsi.SgIoHdr) == c_view["sizeof"]
    for name in FIELDS:
        assert getattr(scsi.SgIoHdr, name).offset == c_view[name], name


def test_fixed_and_descriptor_sense_decode_alike():
    fixed = bytes([0xF0, 0, 0x45, 0, 0, 0, 7, 10, 0, 0, 0, 0, 0x00, 0x02, 0, 0, 0, 0])
    sense = scsi.Sense.parse(fixed)
    assert (sense.key, sense.asc, sense.ascq, sense.end_of_medium, sense.information) == (0x5, 0, 2, True, 7)
    descriptor = bytes([0x72, 0x05, 0x00, 0x02, 0, 0, 0, 16,
                        0x00, 0x0A, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 7,  # information
                        0x04, 0x02, 0, 0x40])  # stream commands: EOM
    assert scsi.Sense.parse(descriptor) == sense
    assert scsi.Sense.parse(b"\x00") is None
    error = scsi.ScsiError("/dev/sg3", "MOVE MEDIUM", sense=scsi.Sense(key=0x5, asc=0x3B, ascq=0x0D))
    assert str(error) == "/dev/sg3: MOVE MEDIUM: ILLEGAL REQUEST, medium destination element full (ASC/ASCQ 0x3b/0x0d)"
    assert error.is_sense(0x5, 0x3B) and not error.is_sense(0x6)
    unknown = scsi.ScsiError("/dev/sg3", "INQUIRY", sense=scsi.Sense(key=0x4, asc=0x99, ascq=0x01))
    assert str(unknown) == "/dev/sg3: INQUIRY: HARDWARE ERROR (ASC/ASCQ 0x99/0x01)"
    assert str(scsi.ScsiError("/dev/sg3", "INQUIRY", errno=13)) == "/dev/sg3: INQUIRY: Permission denied"


def element(address: int, full: bool, barcode: str = "", source: int | None = None) -> bytes:
    """A 52-byte element descriptor with a volume tag, as tgt sends them."""
    tag = barcode.encode().ljust(32) + bytes(8)
    flags = 0x80 if source is not None else 0
    return (address.to_bytes(2, "big") + bytes([0x01 if full else 0, 0, 0, 0, 0, 0, 0, flags])
            + (source or 0).to_bytes(2, "big") + tag)


def test_element_status_pages_decode():
    storage = element(1000, False) + element(1001, True, "VT0002L6")
    drives = element(2, True, "VT0001L6", source=1000)
    report = b""
    for kind, descriptors in ((2, storage), (4, drives)):
        report += bytes([kind, 0x80]) + (52).to_bytes(2, "big") + bytes([0]) + len(descriptors).to_bytes(3, "big")
        report += descriptors
    data = bytes([0x03, 0xE8, 0, 3, 0]) + len(report).to_bytes(3, "big") + report
    found = _parse_element_status(data, "/dev/sg2")
    assert [(e.kind, e.address, e.full, e.barcode, e.source) for e in found] == [
        (ElementKind.STORAGE, 1000, False, None, None),
        (ElementKind.STORAGE, 1001, True, "VT0002L6", None),
        (ElementKind.DRIVE, 2, True, "VT0001L6", 1000),
    ]
    # tgt announces and sends 8 bytes fewer than its report holds: the last descriptor is cut
    # inside its volume tag's reserved bytes, and is decoded all the same.
    cut = _parse_element_status(data[:-8], "/dev/sg2")
    assert cut == found
