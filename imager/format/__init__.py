"""The image format: a seekable zstd file with imager's metadata in skippable frames, the one
place that knows the bytes on disk.

Layout, every piece a zstd frame so that stock `zstd -d` restores the raw volume:

    [header]     skippable frame 0x184D2A50 (meta.py): format version, geometry, source, plan
    [chunk 0]    zstd frame with content size and content checksum (codec.py)
    ...
    [chunk N-1]
    [trailer]    skippable frame 0x184D2A51 (meta.py): totals, the header's checksum, the
                 stream digest, one BLAKE3 digest per chunk
    [seek table] skippable frame 0x184D2A5E (seektable.py), last, as the seekable format requires

The stream digest is the BLAKE3 of every byte before the trailer, so damage that still decodes
to the right bytes (a zstd header field, a block's framing) is found by verify too; the trailer
and the seek table are covered by their own checksum and by matching what precedes them.

writer.py writes an image to any sink; reader.py gives random access through the seek table;
walk.py walks the frames front to back (pipes, tape, damage reports).
"""

from .codec import Codec, EncodedChunk, ZstdCodec, chunk_digest, codec_of, zero_digest, zero_frame, zstd_frame_bound
from .frames import ZSTD_MAGIC, skippable_frame, skippable_payload
from .meta import (DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, DIGEST_SIZE, FORMAT_VERSION, HEADER_MAGIC, HEADER_TAG,
                   MAX_CHUNK_SIZE, TRAILER_MAGIC, ImageHeader, ImageTrailer, decode_header, decode_trailer,
                   encode_header, read_header)
from .reader import ImageReader
from .seektable import SEEK_TABLE_MAGIC, seek_table_mismatch
from .walk import Frame, FrameError, TruncatedFrame, count_rest, garbage_after, iter_frames
from .writer import FrameLog, ImageWriter

__all__ = [
    "DEFAULT_CHUNK_SIZE", "DEFAULT_LEVEL", "DIGEST_SIZE", "FORMAT_VERSION", "HEADER_MAGIC", "HEADER_TAG",
    "MAX_CHUNK_SIZE", "SEEK_TABLE_MAGIC", "TRAILER_MAGIC", "ZSTD_MAGIC", "Codec", "EncodedChunk", "Frame", "FrameError",
    "FrameLog", "ImageHeader", "ImageReader", "ImageTrailer", "ImageWriter", "TruncatedFrame", "chunk_digest",
    "ZstdCodec", "codec_of", "count_rest", "decode_header", "decode_trailer", "encode_header",
    "garbage_after", "iter_frames", "read_header", "seek_table_mismatch", "skippable_frame", "skippable_payload",
    "zero_digest", "zero_frame", "zstd_frame_bound",
]
