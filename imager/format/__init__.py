"""The image format: a seekable zstd file with imager's metadata in skippable frames, the one
place that knows the bytes on disk.

Layout, every piece a zstd frame so that stock `zstd -d` restores the raw volume:

    [header]     skippable frame 0x184D2A50 (meta.py): format version, geometry, kind, chain,
                 source, plan
    [chunk 0]    zstd frame with content size and content checksum (codec.py)
    ...
    [chunk N-1]
    [trailer]    skippable frame 0x184D2A51 (meta.py): totals, the header's checksum, the
                 stream digest, one BLAKE3 digest per block of the volume (blocks.py), the
                 filesystem's use of each block
    [seek table] skippable frame 0x184D2A5E (seektable.py), last, as the seekable format requires

An incremental image holds only the blocks that changed since its parent, each block a frame,
each run of consecutive blocks after a run marker (skippable frame 0x184D2A52, frames.py); its
trailer holds the digest of every block of the volume at its point and the map of what it holds.

The stream digest is the BLAKE3 of every byte before the trailer, so damage that still decodes
to the right bytes (a zstd header field, a block's framing) is found by verify too; the trailer
and the seek table are covered by their own checksum and by matching what precedes them.

writer.py writes an image to any sink; reader.py gives random access through the seek table;
walk.py walks the frames front to back (pipes, tape, damage reports).
"""

from .blocks import (DIGEST_SIZE, block_digests, chain_block_size, digest_of, pack_bits, unpack_bits,
                     zero_block_digests)
from .codec import Codec, EncodedChunk, ZstdCodec, codec_of, zero_frame, zstd_frame_bound
from .frames import RUN_MAGIC, ZSTD_MAGIC, decode_run, skippable_frame, skippable_payload
from ..defaults import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL
from .meta import (FORMAT_VERSION, FULL, HEADER_MAGIC, HEADER_TAG, INCREMENTAL, MAX_CHUNK_SIZE, TRAILER_MAGIC, ImageHeader, ImageTrailer, decode_header, decode_trailer,
                   encode_header, read_header)
from .reader import ImageReader
from .seektable import SEEK_TABLE_MAGIC, FrameNames, seek_table_mismatch
from .walk import Frame, FrameError, TruncatedFrame, count_rest, garbage_after, iter_frames
from .writer import FrameLog, ImageWriter

__all__ = [
    "DEFAULT_CHUNK_SIZE", "DEFAULT_LEVEL", "DIGEST_SIZE", "FORMAT_VERSION", "FULL", "HEADER_MAGIC", "HEADER_TAG",
    "INCREMENTAL", "MAX_CHUNK_SIZE", "RUN_MAGIC", "SEEK_TABLE_MAGIC", "TRAILER_MAGIC", "ZSTD_MAGIC", "Codec",
    "EncodedChunk", "Frame", "FrameError", "FrameLog", "FrameNames", "ImageHeader", "ImageReader", "ImageTrailer",
    "ImageWriter", "TruncatedFrame", "ZstdCodec", "block_digests", "chain_block_size", "codec_of", "count_rest",
    "decode_header", "decode_run", "decode_trailer", "digest_of", "encode_header", "garbage_after", "iter_frames",
    "pack_bits", "read_header", "seek_table_mismatch", "skippable_frame", "skippable_payload", "unpack_bits",
    "zero_block_digests", "zero_frame", "zstd_frame_bound",
]
