"""imager demo: the main job on a built-in default volume, end to end."""

from __future__ import annotations

from .output import Output


def register(sub, parents) -> None:
    sub.add_parser("demo", parents=[parents.common],
                   help="image a sample loop volume end to end").set_defaults(func=run)


def run(args, out: Output) -> int:
    from .. import demo

    return demo.run(out)
