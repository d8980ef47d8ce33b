"""The Linux _IOC request-number encoding (include/uapi/asm-generic/ioctl.h)."""

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, kind: int | str, nr: int, size: int) -> int:
    if isinstance(kind, str):
        kind = ord(kind)
    return (direction << _IOC_DIRSHIFT) | (kind << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def IO(kind: int | str, nr: int) -> int:
    return _ioc(_IOC_NONE, kind, nr, 0)


def IOR(kind: int | str, nr: int, size: int) -> int:
    return _ioc(_IOC_READ, kind, nr, size)


def IOW(kind: int | str, nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, kind, nr, size)


def IOWR(kind: int | str, nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, kind, nr, size)
