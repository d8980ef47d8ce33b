"""The examples at the end of every command's --help (and of the man page)."""

from __future__ import annotations

EXIT_STATUS = """exit status:
  0    success
  1    the job failed (a damaged image, a read or write error, a full cache, ...)
  2    a wrong command line or a refused request (nothing was changed)
  130  interrupted (Ctrl-C or SIGTERM); 141 standard output closed (a broken pipe)"""

EXAMPLES: dict[str, list[str]] = {
    "": ["imager backup /dev/sdb1 -o sdb1.zst", "imager restore sdb1.zst /dev/sdc1 --verify",
         "imager backup --snapshot cow data -o /backup/ -i", "imager tape status --tape /dev/nst0"],
    "backup": ["imager backup /dev/sdb1 -o sdb1.zst                  # used blocks only",
               "imager backup /dev/sda -o sda.zst --level 9            # a whole disk, smaller",
               "imager backup --snapshot cow data logs -o /backup/      # one freeze window for both",
               "imager backup --snapshot cow data -o mon.zst -i         # only what changed",
               "imager backup --snapshot cow data -o '/backup/{name}-{date:%Y%m%d-%H%M}.zst' -i",
               "imager backup /dev/sdb1 -o - | ssh vault 'cat > b.zst'  # a stream to stdout",
               "imager backup /dev/sdb1 --tape /dev/nst0 --label WEEKLY1",
               "imager backup /dev/sda --tape /dev/nst0 --changer /dev/sg3  # spans onto the library's blanks"],
    "restore": ["imager restore sdb1.zst /dev/sdc1 --verify",
                "imager restore mon.zst volume.raw                      # an incremental's point",
                "ssh vault cat b.zst | imager restore - /dev/sdc1",
                "imager restore --tape /dev/nst0 --image 3f2a /dev/sdc1",
                "imager restore --tape /dev/nst0 --changer /dev/sg3 --image 3f2a /dev/sdc  # cartridges by label"],
    "verify": ["imager verify sdb1.zst", "imager verify mon.zst             # the chain point, through its parents",
               "imager verify --tape /dev/nst0                    # every image on the tape"],
    "info": ["imager info sdb1.zst", "imager info --json sdb1.zst | jq .header.plan"],
    "consolidate": ["imager consolidate fri.zst -o fri-full.zst",
                    "imager consolidate fri.zst --tape /dev/nst0 --label WEEKLY2"],
    "mount": ["imager mount sdb1.zst /mnt/restore          # read-only, the daemon outlives the terminal",
              "imager mount tue.zst /mnt/tuesday --json     # an incremental at its point",
              "imager mount sda.zst /mnt/disk              # a whole disk: /mnt/disk/1-EFI, /mnt/disk/2-root, ..."],
    "umount": ["imager umount /mnt/restore"],
    "mounts": ["imager mounts", "imager mounts --json"],
    "ls": ["imager ls sdb1.zst", "imager ls tue.zst etc/ssh"],
    "extract": ["imager extract tue.zst etc/fstab home/ann/notes -C /tmp/back",
                "imager extract sdb1.zst srv/www -C /srv/www.restored"],
    "loop": ["imager loop attach disk.img", "imager loop list"],
    "loop attach": ["imager loop attach disk.img             # prints /dev/loopN",
                    "imager loop attach disk.img --read-only"],
    "loop detach": ["imager loop detach /dev/loop3"],
    "loop list": ["imager loop list --json"],
    "catalog": ["imager catalog list", "imager catalog prune --keep-daily 7 --keep-weekly 4 -n"],
    "catalog list": ["imager catalog list", "imager catalog list --source /dev/sdb1 --since 7d",
                     "imager catalog list --json"],
    "catalog prune": ["imager catalog prune --keep-last 10 -n            # what would go",
                      "imager catalog prune --keep-daily 7 --keep-weekly 4 --consolidate"],
    "catalog forget": ["imager catalog forget 3f2a9c1b", "imager catalog forget 3f2a 77b0 --force"],
    "catalog check": ["imager catalog check || mail -s 'backups need a look' root"],
    "tape": ["imager tape status --tape /dev/nst0", "TAPE=/dev/nst0 imager tape list"],
    "tape status": ["imager tape status --tape /dev/nst0", "imager tape status --label    # rewinds to read it"],
    "tape rewind": ["imager tape rewind --tape /dev/nst0"],
    "tape eom": ["imager tape eom --tape /dev/nst0"],
    "tape eod": ["imager tape eod --tape /dev/nst0"],
    "tape unload": ["imager tape unload --tape /dev/nst0"],
    "tape offline": ["imager tape offline --tape /dev/nst0"],
    "tape fsf": ["imager tape fsf 2 --tape /dev/nst0"],
    "tape bsf": ["imager tape bsf 1 --tape /dev/nst0"],
    "tape fsr": ["imager tape fsr 10 --tape /dev/nst0"],
    "tape bsr": ["imager tape bsr 1 --tape /dev/nst0"],
    "tape seek": ["imager tape seek 1200 --tape /dev/nst0     # a block position from tell"],
    "tape tell": ["imager tape tell --tape /dev/nst0"],
    "tape weof": ["imager tape weof --tape /dev/nst0", "imager tape weof 2 --tape /dev/nst0"],
    "tape setblk": ["imager tape setblk 0 --tape /dev/nst0      # variable-size blocks"],
    "tape compression": ["imager tape compression --tape /dev/nst0", "imager tape compression off --tape /dev/nst0"],
    "tape erase": ["imager tape erase --tape /dev/nst0 --force"],
    "tape label": ["imager tape label WEEKLY1 --tape /dev/nst0", "imager tape label R1 --tape rehearsal.tap"],
    "tape list": ["imager tape list --tape /dev/nst0", "imager tape list --tape 'vault/t-{n:03}.tap' --json"],
    "tape read": ["imager tape read --file 2 --tape /dev/nst0 | zstd -d > volume.raw",
                  "imager tape read --file 2 --image-only -o sdb1.zst --tape /dev/nst0   # then mount, info, verify"],
    "tape scan": ["imager tape scan --tape /dev/nst0 --catalog rebuilt.sqlite"],
    "attach": ["imager attach /dev/sdb1 --name data       # prints the front, e.g. /dev/loop3",
               "imager attach /dev/sdb1 --name data --cache /var/lib/imager/data"],
    "detach": ["imager detach data"],
    "volumes": ["imager volumes", "imager volumes --json"],
    "volumes restart": ["apt upgrade imager; imager volumes restart data     # the new version serves data"],
    "recover": ["umount /srv/data; imager recover data"],
    "snapshot": ["imager snapshot create data", "imager snapshot list"],
    "snapshot create": ["imager snapshot create data logs       # one freeze window"],
    "snapshot list": ["imager snapshot list --json"],
    "snapshot delete": ["imager snapshot delete data"],
    "devices": ["imager devices", "imager devices --json"],
    "demo": ["imager demo"],
    "completion": ["source <(imager completion bash)", "imager completion zsh > ~/.zfunc/_imager"],
    "manpage": ["imager manpage | man -l -"],
    "systemd-unit": ["imager systemd-unit > /etc/systemd/system/imager-volume@.service",
                     "echo DEVICE=/dev/disk/by-id/ata-EXAMPLE-part1 > /etc/imager/volumes/data.conf",
                     "imager systemd-unit --fstab data /srv/data >> /etc/fstab; systemctl daemon-reload"],
    "schema": ["imager schema > imager.schema.json", "imager schema | jq '.[\"$defs\"][\"tape list\"]'"],
}


def epilog(path: str) -> str | None:
    lines = EXAMPLES.get(path)
    text = "examples:\n" + "\n".join(f"  {line}" for line in lines) if lines else None
    if path == "":
        text = f"{text}\n\n{EXIT_STATUS}"
    return text
