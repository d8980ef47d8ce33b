"""Tape layout: labels, one tape file per image, spanning cartridges, scanning, reading back.

    file 0      label block: skippable frame 0x184D2A52 (b"IMGRLBL2", checksum, JSON: label, set, sequence)
    file 1..    one image segment each:
                  segment header block: skippable frame 0x184D2A53 (b"IMGRSEG2", checksum, JSON)
                  the image byte stream (exactly the bytes of an image file), in blocks of block_size
                  segment end block:    skippable frame 0x184D2A54 (b"IMGREND2", checksum, JSON: lengths,
                                        whether it continues on the next cartridge, the image record)
                filemark after each file

The checksum is the BLAKE3 digest of the JSON that follows it (32 bytes). A block whose checksum
fails is reported as damaged and never trusted. The segment header is a file's first block and
the end block its last, so a data block can never be taken for either.

A tape file at the end of data that has a segment header but no end block is what an interrupted
write leaves (closed by a filemark or not, its last record possibly torn): it holds no restorable
image, `tape list` shows it INCOMPLETE, and the next image written to the cartridge replaces it,
taking its file number.

Every header block is a zstd skippable frame, so `dd if=/dev/nst0 bs=SIZE | zstd -d` (or
`imager tape read --file N | zstd -d`) restores an image that fits one cartridge with standard
tools. An image that reaches the early-warning zone ends its segment at the next zstd frame
boundary and goes on in file 1 of the next cartridge of the set, so the segments of a spanned
image concatenated are a valid zstd stream too.
"""

from .blocks import DEFAULT_BLOCK_SIZE, DamagedBlock
from .labels import Label, drive_status, read_label, require_label, tape_is_blank, write_label
from .scan import TapeFileInfo, part_of_an_image, scan_files
from .sink import TapeSink, WrittenSegment, output_counting
from .spec import TapeSpec, operator_prompt
from .stream import TapeImageStream, segment_header

__all__ = [
    "DEFAULT_BLOCK_SIZE", "DamagedBlock", "Label", "TapeFileInfo", "TapeImageStream", "TapeSink", "TapeSpec",
    "WrittenSegment", "drive_status", "part_of_an_image", "operator_prompt", "read_label", "require_label", "scan_files",
    "output_counting", "segment_header", "tape_is_blank", "write_label",
]
