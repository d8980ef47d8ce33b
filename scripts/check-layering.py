"""Fails when anything in devices/ imports the imager engine: hardware access stays below it."""
import ast
import pathlib
import sys

bad = []
for path in pathlib.Path(__file__).resolve().parent.parent.joinpath("devices").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        bad += [f"{path}:{node.lineno}: imports {n}" for n in names if n.split(".")[0] == "imager"]
print("\n".join(bad) or "layering ok")
sys.exit(1 if bad else 0)
