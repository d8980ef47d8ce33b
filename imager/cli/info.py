"""imager info: what an image holds."""

from __future__ import annotations

from ..units import human_bytes
from .output import Output


def register(sub, parents) -> None:
    i = sub.add_parser("info", parents=[parents.common], help="show what an image holds")
    i.add_argument("image", help="image file (- for standard input)")
    i.set_defaults(func=run)


def run(args, out: Output) -> int:
    from .. import jobs
    from .feeds import stdin_feed

    found = jobs.info_feed(stdin_feed()) if args.image == "-" else jobs.info(args.image)
    h, t = found.header, found.totals
    src, snap, plan = h.source, h.snapshot, h.plan
    out.result(found.to_dict(), [
        f"image:       {args.image}",
        f"volume:      {human_bytes(h.volume_size)} ({h.volume_size} bytes), sector {h.sector_size}",
        f"source:      {src.get('path', '?')}"
        + (f" ({src.get('fs_type')}" + (f", label {src['label']}" if src.get("label") else "") + ")"
           if src.get("fs_type") else ""),
        f"snapshot:    {snap.get('provider', '?')} at {snap.get('time', '?')}",
        f"plan:        {plan.get('mode', '?')}"
        + (f" ({human_bytes(plan['used_bytes'])} used)" if plan.get("used_bytes") is not None else "")
        + (f", reason: {plan['reason']}" if plan.get("reason") else "")
        + (f", excluded: {', '.join(plan['excludes'])}" if plan.get("excludes") else ""),
    ] + _chain_lines(h, t) + [
        # The trailer of an incremental or a synthetic full does not count zero chunks.
        f"chunks:      {t.get('chunks', h.chunk_count)} of {human_bytes(h.chunk_size)}, "
        + (f"{t['zero_chunks']} zero, " if "zero_chunks" in t else "") + f"level {h.level}",
        f"size:        {human_bytes(found.file_size)}"
        + ("" if h.incremental else f", ratio {found.ratio:.2f}"),
        f"created:     {h.created} by {h.tool}",
        f"complete:    {'yes' if t.get('complete') else 'no'}",
    ] + _partition_lines(h.partitions))
    return 0


def _chain_lines(h, totals: dict) -> list[str]:
    chain = h.chain
    tracker = chain.get("tracker") or {}
    lines = []
    if h.incremental:
        parent = chain.get("parent") or {}
        lines.append(f"kind:        incremental on {parent.get('id')} ({parent.get('name') or 'no file name'})")
        lines.append(f"changes:     by {chain.get('method')}: {chain.get('reason')}; {totals.get('held_blocks', '?')} "
                     f"of {h.block_count} blocks of {human_bytes(h.block_size)} held")
    elif chain.get("consolidated"):
        lines.append(f"kind:        full, synthetic: the point of {chain['consolidated'][0]} "
                     f"(a chain of {len(chain['consolidated'])} images)")
    else:
        lines.append("kind:        full" + (f" ({chain['reason']})" if chain.get("reason") else ""))
    if tracker:
        lines.append(f"tracker:     series {tracker.get('series')}, sequence {tracker.get('sequence')}")
    return lines


def _partition_lines(table: dict | None) -> list[str]:
    if not table:
        return []
    lines = [f"partitions:  {table['scheme']} table, {len(table['partitions'])} partitions"]
    for p in table["partitions"]:
        lines.append(f"  {p['number']:>3}  start {p['start_byte']:>14}  size {human_bytes(p['size_bytes']):>10}  "
                     f"{p.get('type_name') or p['type_id']}" + ("  (EFI system)" if p.get("is_esp") else "")
                     + (f"  {p['name']}" if p.get("name") else ""))
    return lines
