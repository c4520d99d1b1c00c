"""The import floors of docs/architecture.md, read from every module's imports (lazy ones too):
benchmarks → jobs → runtime → models → pipeline | bank | losses, and no job importing another."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAY_IMPORT = {  # folder -> project folders it may import
    "losses": set(), "bank": set(), "pipeline": set(), "models": {"losses", "pipeline"},
    "runtime": {"models", "pipeline", "bank", "losses"},
    "jobs": {"runtime", "models", "pipeline", "bank", "losses"},
}


def project_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_every_folder_imports_only_the_floors_below_it():
    wrong = []
    for folder, allowed in MAY_IMPORT.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name in project_imports(path):
                top = name.split(".")[0]
                if top in MAY_IMPORT and top != folder and top not in allowed:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert wrong == []


def test_no_job_imports_another_job():
    jobs = {p.stem for p in (ROOT / "jobs").glob("*.py")}
    wrong = [f"{p.name} imports {name}" for p in sorted((ROOT / "jobs").glob("*.py"))
             for name in project_imports(p) if name.startswith("jobs.") and name.split(".")[1] in jobs]
    assert wrong == []
