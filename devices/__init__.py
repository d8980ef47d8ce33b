"""Hardware access: block devices, aligned buffers, loop devices, discovery, tape drives.

Nothing in this package imports the `imager` engine.
"""
