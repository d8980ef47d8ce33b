"""The engine's defaults that the command line shows in its help, in a module that imports
nothing: `imager --help`, `imager mounts` and the like build their parser without loading the
engine (numpy, zstd, the formats), which is most of a command's start."""

# Bytes of volume per zstd frame of a full image, and the zstd level: bench/sweep.py (README).
DEFAULT_CHUNK_SIZE = 4 << 20
DEFAULT_LEVEL = 3

# How long the filesystems of a snapshot may stay frozen: taking a snapshot needs milliseconds.
DEFAULT_MAX_FREEZE = 5.0
# The freeze provider reads whole volumes while frozen (small ones): a longer, still finite bound.
DEFAULT_MAX_FREEZE_READ = 300.0

# The snapshot providers by name (imager.snapshot.provider.PROVIDERS has one of each).
SNAPSHOT_PROVIDERS = ("none", "freeze", "cow")

# Decoded regions a mount's daemon keeps (imager.mount.volume.CachedVolume).
DEFAULT_MOUNT_CACHE_BYTES = 64 << 20

# Tape block written (imager.tape): LTO streams well with 256 KiB to 1 MiB blocks.
DEFAULT_TAPE_BLOCK_SIZE = 1 << 20
