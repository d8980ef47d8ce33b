"""Starting helper processes of this very engine (the volume daemon, the freeze guard)."""

from __future__ import annotations

import os

# The directory that holds the imager and devices packages.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def engine_env() -> dict[str, str]:
    """This process's environment with the engine's own root first on PYTHONPATH, so that a child
    `python -m imager....` imports this very engine, also from a source checkout that is not
    installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env
