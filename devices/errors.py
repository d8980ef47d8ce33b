"""Errors raised by device access, each carrying a message fit to show a user on one line."""


class DeviceError(Exception):
    """A device could not be opened, read, written or controlled."""
