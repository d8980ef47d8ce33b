"""imager: point-in-time images of block devices in use, to seekable zstd images and tape."""

__version__ = "0.1.0"
