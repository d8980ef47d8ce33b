"""imager tape ...: drives and virtual tapes, in the spirit of mt, and what is on them."""

from __future__ import annotations

import sys

from .. import jobs
from ..catalog import Catalog, TapeRecord
from ..errors import UsageError
from ..ends.sinks import FileSink
from ..tape import DEFAULT_BLOCK_SIZE, TapeSpec, drive_status, operator_prompt, require_label, tape_is_blank, write_label
from ..units import count, human_bytes
from .output import Output

_MOVES = {"rewind": "rewind the tape", "eom": "go to the end of recorded data", "unload": "rewind and eject"}
_SPACES = {"fsf": "forward space N files", "bsf": "backward space N files"}


def register(sub, parents) -> None:
    tp = sub.add_parser("tape", help="tape drives and virtual tapes, in the spirit of mt")
    tsub = tp.add_subparsers(dest="tape_command", required=True, metavar="ACTION")

    def verb(name: str, help_text: str, func):
        c = tsub.add_parser(name, parents=[parents.common, parents.catalog, parents.tape], help=help_text)
        c.set_defaults(func=func)
        return c

    verb("status", "drive status (MTIOCGET), without moving the tape", status).add_argument(
        "--label", action="store_true", help="also read the tape label (rewinds the tape)")
    for name, text in _MOVES.items():
        verb(name, text, move)
    for name, text in _SPACES.items():
        verb(name, text, move).add_argument("count", type=count)
    tl = verb("label", "write a volume label at the start of the tape", label)
    tl.add_argument("name")
    tl.add_argument("-f", "--force", action="store_true", help="overwrite a labelled or used tape")
    verb("list", "the tape files and what each holds", listing)
    rd = verb("read", "write the bytes of tape file N to stdout (or -o FILE)", read)
    rd.add_argument("--file", type=count, required=True, metavar="N")
    rd.add_argument("--image-only", action="store_true",
                    help="only the image: without the tape's segment header and end block, continued on the next "
                         "cartridges, so that -o FILE is an image file that mount, info and verify take")
    rd.add_argument("-o", "--output", metavar="FILE", help="write to FILE (appears only when complete)")
    rd.add_argument("-f", "--force", action="store_true", help="replace an existing FILE")
    verb("scan", "rebuild the catalog entries of a tape from the media", scan)


def tape_spec(args) -> TapeSpec:
    if not args.tape:
        raise UsageError("give the tape with --tape /dev/nstN or --tape FILE.tap")
    return TapeSpec(args.tape, capacity=args.tape_capacity, changer=getattr(args, "changer", None),
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
         "fsf": lambda: drive.forward_space_files(args.count), "bsf": lambda: drive.backward_space_files(args.count),
         "unload": lambda: drive.unload()}[args.tape_command]()
        st = None if args.tape_command == "unload" else drive.status()
    out.result({"tape": args.tape, "file_number": st.file_number if st else None},
               [f"{args.tape}: {args.tape_command} done" + (f", at file {st.file_number}" if st else "")])
    return 0


def label(args, out: Output) -> int:
    with tape_spec(args).open(1, create=True) as drive:
        written = write_label(drive, args.name, force=args.force, block_size=args.block_size or DEFAULT_BLOCK_SIZE)
    with Catalog(args.catalog) as catalog:
        catalog.forget_tape(written.label)
        catalog.add_tape(TapeRecord(written.label, written.tape_set, written.sequence, written.created))
    out.result(written.__dict__, [f"{args.tape}: labelled {written.label!r}"])
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
    if args.image_only and args.output and args.output != "-":
        found = jobs.read_tape_image(tape_spec(args), args.file, args.output, force=args.force,
                                     block_size=args.block_size)
        out.result(dict(found.to_dict(), tape_file=args.file, output=args.output),
                   [f"{args.output}: image {found.header.image_id[:12]} of tape file {args.file}, "
                    f"{human_bytes(found.file_size)} (a {human_bytes(found.header.volume_size)} volume)"])
        return 0
    if args.image_only:
        stream = jobs.open_tape_file(tape_spec(args), args.file, args.block_size)
        try:
            while piece := stream.read(1 << 20):
                sys.stdout.buffer.write(piece)
        finally:
            stream.close()
        sys.stdout.buffer.flush()
        return 0
    sink = FileSink(args.output, force=args.force) if args.output and args.output != "-" else None
    try:
        with tape_spec(args).open(1, create=False) as drive:
            require_label(drive)
            drive.skip_to_file(args.file)
            for block in drive.read_file(args.block_size or DEFAULT_BLOCK_SIZE):
                (sink or sys.stdout.buffer).write(block)
        if sink is not None:
            sink.commit()
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    sys.stdout.buffer.flush()
    return 0


def scan(args, out: Output) -> int:
    with Catalog(args.catalog) as catalog:
        files = jobs.scan_tape(tape_spec(args), catalog)
        images = {f.image_id for f in files if f.kind == "image" and f.image}
    out.result({"tape": args.tape, "images": sorted(images), "files": len(files)},
               [f"{args.tape}: {len(files)} tape files, {len(images)} images recorded in {catalog.path}"])
    return 0
