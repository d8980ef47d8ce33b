"""What a backup reads: the used-block map of a volume (usedmap) and the one planner that makes
it from the filesystem, the partition table, excludes and --all-blocks (planner)."""
