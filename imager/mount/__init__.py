"""Images served read-only, for file-level restore: the flow of `imager mount`, `ls` and `extract`.

    image files (a full, or an incremental and its parents)
      -> volume.CachedVolume   random access through the seek tables; a bounded LRU cache of
                               decoded, checked regions; read-ahead decoded in parallel; a damaged
                               region fails with EIO, logged once
      -> serve.VolumeServer    the volume, and each partition, as read-only FUSE files
      -> layout                what the volume holds: a filesystem, or a disk's partitions; each
                               mounted read-only over a read-only loop device, or shown as its file
      -> daemon                `imager mount`: shown at the user's directory until umount
         private               `imager ls` / `extract`: in a private mount namespace, then gone
    registry                   what is mounted where, recorded before it is created, so that
                               umount clears everything, also after the daemon was killed
"""
