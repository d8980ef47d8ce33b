"""What the tape verbs do (imager.cli.tape registers them): drives and virtual tapes, in the
spirit of mt, and what is on them."""

from __future__ import annotations

import errno
import itertools
import sys

from devices.tape.drive import TapeError

from .. import jobs
from ..catalog import Catalog, TapeRecord
from ..errors import TapeMediaError, UsageError
from ..ends.sinks import FileSink
from ..tape import (DEFAULT_BLOCK_SIZE, DamagedBlock, TapeSpec, drive_status, operator_prompt, part_of_an_image,
                    read_label, require_label, tape_is_blank, write_label)
from ..units import human_bytes
from .output import Output


def tape_spec(args) -> TapeSpec:
    if not args.tape:
        raise UsageError("give the tape with --tape /dev/nstN or --tape FILE.tap (the tape verbs also use $TAPE)")
    return TapeSpec(args.tape, capacity=getattr(args, "tape_capacity", None), changer=getattr(args, "changer", None),
                    prompt=operator_prompt)


def status(args, out: Output) -> int:
    with tape_spec(args).open(1, create=False) as drive:
        if args.label:
            out.notice(f"{args.tape}: rewinding to read the label")
        st, found = drive_status(drive, with_label=args.label)
        blank = tape_is_blank(drive, may_move=args.label) if found is None else False
    flags = [name for name in ("bot", "eof", "eot", "eod", "write_protected", "online") if getattr(st, name)]
    data = {"tape": args.tape, "status": dict(st.__dict__), "label": found.__dict__ if found else None,
            "blank": blank}
    if found:
        label_line = f"label: {found.label} (cartridge {found.sequence} of set {found.tape_set[:12]})"
    elif blank:
        label_line = f"label: none, the tape is blank (label it with: imager tape label NAME --tape {args.tape})"
    elif args.label:
        label_line = "label: none; the tape holds data that is not an imager label"
    else:
        label_line = "label: not read (--label rewinds to read it)"
    out.result(data, [f"{args.tape}: file {st.file_number}, block {st.block_number}, "
                      f"block size {st.block_size or 'variable'}, {' '.join(flags) or 'no flags'}"
                      + (", blank tape (nothing recorded)" if blank else ""), label_line])
    return 0


def move(args, out: Output) -> int:
    with tape_spec(args).open(1, create=False) as drive:
        {"rewind": lambda: drive.rewind(), "eom": lambda: drive.seek_end_of_data(),
         "eod": lambda: drive.seek_end_of_data(),
         "fsf": lambda: drive.forward_space_files(args.count), "bsf": lambda: drive.backward_space_files(args.count),
         "fsr": lambda: drive.forward_space_records(args.count),
         "bsr": lambda: drive.backward_space_records(args.count), "seek": lambda: drive.seek(args.count),
         "unload": lambda: drive.unload(), "offline": lambda: drive.unload()}[args.tape_command]()
        ejected = args.tape_command in ("unload", "offline")
        st = None if ejected else drive.status()
        block = None if ejected else drive.tell()
    out.result({"tape": args.tape, "file_number": st.file_number if st else None,
                "block_number": st.block_number if st else None, "position": block},
               [f"{args.tape}: {args.tape_command} done" + (f", at file {st.file_number}, block {st.block_number} "
                                                            f"(position {block})" if st else "")])
    return 0


def tell(args, out: Output) -> int:
    with tape_spec(args).open(1, create=False) as drive:
        block = drive.tell()
    out.result({"tape": args.tape, "position": block}, [f"At block {block}."])
    return 0


def weof(args, out: Output) -> int:
    with tape_spec(args).open(1, create=False) as drive:
        drive.write_filemarks(args.count)
        block = drive.tell()
    out.result({"tape": args.tape, "filemarks": args.count, "position": block},
               [f"{args.tape}: wrote {args.count} filemark{'s' if args.count != 1 else ''}, at block {block}"])
    return 0


def setblk(args, out: Output) -> int:
    with tape_spec(args).open(1, create=False) as drive:
        if args.size:
            try:
                drive.block_limits().check(args.size)
            except ValueError as e:
                raise UsageError(f"{args.tape}: {e}") from None
        drive.set_block_size(args.size)
    out.result({"tape": args.tape, "block_size": args.size},
               [f"{args.tape}: block size {args.size or 'variable'}"])
    return 0


def compression(args, out: Output) -> int:
    with tape_spec(args).open(1, create=False) as drive:
        if args.state is not None:
            drive.set_compression(args.state in ("on", "1"))
        state = drive.compression()
    if state is None:
        shown = "unknown (the drive does not say)"
    else:
        shown = ("on" if state.enabled else "off") if state.capable else "not available on this drive"
    out.result({"tape": args.tape, "compression": None if state is None else
                {"capable": state.capable, "enabled": state.enabled}},
               [f"{args.tape}: compression {shown}"])
    return 0


def erase(args, out: Output) -> int:
    with tape_spec(args).open(1, create=False) as drive:
        if not args.force and not tape_is_blank(drive, may_move=True):
            raise UsageError(f"{args.tape} holds a label or data; erasing destroys all of it: use --force")
        try:
            label = read_label(drive)
        except (DamagedBlock, TapeMediaError):
            label = None
        # MTERASE erases from where the tape stands: the whole tape is erased from its start.
        drive.rewind()
        drive.erase()
    lines = [f"{args.tape}: erased"]
    if label is not None:
        # Its images are gone: no incremental may take one for its parent, no restore look there.
        with Catalog(args.catalog) as catalog:
            catalog.forget_tape(label.label)
        lines.append(f"the catalog no longer lists tape {label.label!r} or the images on it")
    out.result({"tape": args.tape, "erased": True}, lines)
    return 0


def label(args, out: Output) -> int:
    with tape_spec(args).open(1, create=True) as drive:
        written = write_label(drive, args.name, force=args.force, block_size=args.block_size or DEFAULT_BLOCK_SIZE)
    with Catalog(args.catalog) as catalog:
        catalog.forget_tape(written.label)
        catalog.add_tape(TapeRecord(written.label, written.tape_set, written.sequence, written.created))
    out.result(dict(written.__dict__, tape=args.tape), [f"{args.tape}: labelled {written.label!r}"])
    return 0


def listing(args, out: Output) -> int:
    files = jobs.scan_tape(tape_spec(args))
    lines = [_file_line(f) for f in files]
    out.result({"tape": args.tape, "files": [f.to_dict() for f in files]}, lines or [f"{args.tape}: no images"])
    return 0


def _file_line(f) -> str:
    if f.kind == "damaged":
        return f"{f.label} file {f.tape_file}: DAMAGED: {f.problem}"
    if f.kind != "image":
        return f"{f.label} file {f.tape_file}: not an imager image"
    img = f.image or {}
    if f.problem:
        state = f"DAMAGED: {f.problem}"
    elif f.incomplete:
        state = "INCOMPLETE (an interrupted write; the next backup to this cartridge replaces it)"
    else:
        state = "continues on the next cartridge" if f.continued else "complete"
    size = f"{human_bytes(f.stream_length)} on tape, " if f.stream_length is not None else ""
    return (f"{f.label} file {f.tape_file}: image {f.image_id[:12]} segment {f.segment}, {size}{state}"
            + (f", {img.get('source')} ({human_bytes(img.get('volume_size', 0))}) {img.get('created')}" if img else ""))


def read(args, out: Output) -> int:
    to_file = bool(args.output and args.output != "-")
    if not to_file:
        # Standard output carries the tape file's bytes: the summary (and --json) goes to stderr.
        out.summary_stream = sys.stderr
    if args.image_only and to_file:
        found = jobs.read_tape_image(tape_spec(args), args.file, args.output, force=args.force,
                                     block_size=args.block_size)
        out.result(dict(found.to_dict(), tape=args.tape, tape_file=args.file, output=args.output),
                   [f"{args.output}: image {found.header.image_id[:12]} of tape file {args.file}, "
                    f"{human_bytes(found.file_size)} (a {human_bytes(found.header.volume_size)} volume)"])
        return 0
    written = 0
    if args.image_only:
        stream = jobs.open_tape_file(tape_spec(args), args.file, args.block_size)
        try:
            while piece := stream.read(1 << 20):
                sys.stdout.buffer.write(piece)
                written += len(piece)
        finally:
            stream.close()
        sys.stdout.buffer.flush()
    else:
        written = _copy_tape_file(args)
    out.result({"tape": args.tape, "tape_file": args.file, "output": args.output or "-", "bytes": written},
               [f"tape file {args.file}: {human_bytes(written)} to {args.output or 'standard output'}"]
               if to_file or out.json else [])
    return 0


def _copy_tape_file(args) -> int:
    """Every block of the tape file, as it is on tape, to -o or standard output."""
    sink = FileSink(args.output, force=args.force) if args.output and args.output != "-" else None
    written = 0
    try:
        with tape_spec(args).open(1, create=False) as drive:
            require_label(drive)
            drive.skip_to_file(args.file)
            blocks = drive.read_file(args.block_size or DEFAULT_BLOCK_SIZE)
            try:
                first = next(blocks, None)
            except TapeError as e:
                if e.errno != errno.EIO:        # EIO: the end of the recorded data (st)
                    raise
                first = None
            if first is None:
                # imager writes no empty tape file: an empty read is the end of the recording.
                raise TapeMediaError(f"{args.tape}: there is no tape file {args.file} (the recorded data ends "
                                     f"before it)")
            last = first
            for block in itertools.chain([first], blocks):
                (sink or sys.stdout.buffer).write(block)
                written += len(block)
                last = block
        if sink is not None:
            sink.commit()
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    sys.stdout.buffer.flush()
    # `zstd -d` of a part of an image would give the start of a volume, and no error.
    part = part_of_an_image(args.file, first, last)
    if part:
        raise TapeMediaError(part)
    return written


def scan(args, out: Output) -> int:
    with Catalog(args.catalog) as catalog:
        files = jobs.scan_tape(tape_spec(args), catalog)
        images = {f.image_id for f in files if f.kind == "image" and f.image}
    out.result({"tape": args.tape, "images": sorted(images), "files": len(files)},
               [f"{args.tape}: {len(files)} tape files, {len(images)} images recorded in {catalog.path}"])
    return 0
