"""Fails when an import goes against the data flow. Layers, lowest first; a module may import its
own package and anything in a lower layer, nothing above:

    devices                         kernel interfaces; imports nothing from imager
    errors units progress failpoints private spawn views (the JSON names) defaults (what --help shows)
    format plan                     the image format; the used-block planner
    ends                            sources, sinks, feeds, restore targets, path guards
    snapshot tape catalog mount     point in time (providers, COW, daemon); tape layout; the record;
                                    images served read-only (mount)
    pipeline                        the stages
    jobs api                        one module per verb; the public API
    cli demo schema                 the command line; the schema of its --json
"""
import ast
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = [
    {"devices"},
    {"imager.errors", "imager.units", "imager.progress", "imager.failpoints", "imager.private", "imager.spawn",
     "imager.views", "imager.defaults"},
    {"imager.format", "imager.plan"},
    {"imager.ends"},
    {"imager.snapshot", "imager.tape", "imager.catalog", "imager.mount"},
    {"imager.pipeline"},
    {"imager.jobs", "imager.api"},
    {"imager.cli", "imager.demo", "imager.schema"},
]


def unit_of(module: str) -> str | None:
    """The layered unit a dotted module name belongs to (the longest prefix listed)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if any(candidate in layer for layer in LAYERS):
            return candidate
    return None


def layer_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def imports(path: pathlib.Path, module: str) -> list[tuple[int, str]]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module:
                found.append((node.lineno, target))
            else:  # `from . import a, b`: each name may be a module of its own
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


def main() -> int:
    bad = []
    for path in sorted(list(ROOT.joinpath("devices").rglob("*.py")) + list(ROOT.joinpath("imager").rglob("*.py"))):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module.endswith(".__init__"):
            module = module[:-len(".__init__")]
        own = unit_of(module)
        if own is None:
            if module != "imager":
                bad.append(f"{path}: {module} is in no layer (add it to scripts/check-layering.py)")
            continue
        for line, target in imports(path, module):
            other = unit_of(target)
            if other is None or other == own:
                continue
            if layer_of(other) > layer_of(own):
                bad.append(f"{path}:{line}: {own} imports {target} from a layer above it")
    print("\n".join(bad) or "layering ok")
    return 1 if bad else 0


sys.exit(main())
