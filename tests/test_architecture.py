"""Who imports whom (docs/architecture.md): `models` knows nothing of LoRA or meshes, `lora_jax`
nothing of the models or meshes; `sharding` sits on both; `remat_policies` (policy names) sits
under all three and imports none. Read from the source with `ast`, imports inside
functions included, so a lazy `import models` in a function is caught too."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lora_jax", "models", "sharding", "remat_policies")
FORBIDDEN = {"models": {"lora_jax", "sharding"}, "lora_jax": {"models", "sharding"},
             "sharding": set(), "remat_policies": {"lora_jax", "models", "sharding"}}


def imported_packages(file: Path) -> set[str]:
    """Top-level packages named by every import statement of `file`, at any depth."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def edges() -> list[tuple[str, str]]:
    """(file relative to the repo, package) for every cross-package import."""
    out = []
    for package in PACKAGES:
        for file in sorted((ROOT / package).rglob("*.py")):
            for imported in imported_packages(file) & set(PACKAGES) - {package}:
                out.append((file.relative_to(ROOT).as_posix(), imported))
    return out


def test_import_graph_points_one_way():
    bad = [(f, p) for f, p in edges() if p in FORBIDDEN[f.split("/")[0]]]
    assert not bad, f"forbidden imports (file, package): {bad}"


def test_the_reader_sees_imports_inside_functions(tmp_path):
    file = tmp_path / "m.py"
    file.write_text("def f():\n    from models.layout import FAMILIES\n    import sharding.mesh\n")
    assert imported_packages(file) == {"models", "sharding"}
