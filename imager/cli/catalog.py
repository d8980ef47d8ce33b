"""imager catalog list: every image the catalog knows and where its pieces are."""

from __future__ import annotations

from ..catalog import Catalog, record_dict
from ..units import human_bytes
from .output import Output


def register(sub, parents) -> None:
    cp = sub.add_parser("catalog", help="the record of images and where they live")
    csub = cp.add_subparsers(dest="catalog_command", required=True, metavar="ACTION")
    csub.add_parser("list", parents=[parents.common, parents.catalog],
                    help="list the images in the catalog").set_defaults(func=listing)


def listing(args, out: Output) -> int:
    with Catalog(args.catalog) as catalog:
        rows = []
        lines = []
        for img in catalog.images():
            segments = catalog.segments(img.id)
            rows.append({"image": record_dict(img), "segments": [record_dict(s) for s in segments]})
            where = "; ".join(s.path if s.kind == "file" else f"tape {s.tape_label} file {s.tape_file}"
                              for s in segments)
            lines.append(f"{img.id[:12]}  {img.created}  {img.source}  {human_bytes(img.volume_size)}  "
                         f"-> {human_bytes(img.stream_bytes)}  {where}")
    out.result({"catalog": str(catalog.path), "images": rows}, lines or [f"no images in {catalog.path}"])
    return 0
