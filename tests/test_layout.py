"""The layout's rules: Ray in three places only, the job runner only in jobs, jobs that only call the library."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RAY_MODULES = {"pipeline/compress/executors/ray_data.py", "pipeline/loader/ray_data.py"}
RAY_PACKAGE = "pipeline/ray_train/"


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (a lazy import inside a function counts too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def library_files() -> list[Path]:
    return sorted((REPO / "pipeline").rglob("*.py"))


def relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_only_the_ray_executor_ray_train_and_the_loaders_ray_data_import_ray():
    importers = {relative(p) for p in library_files()
                 if any(m == "ray" or m.startswith("ray.") for m in imported_modules(p))}
    assert {p for p in importers if not p.startswith(RAY_PACKAGE)} == RAY_MODULES
    assert any(p.startswith(RAY_PACKAGE) for p in importers)


def test_only_the_job_runner_is_imported_from_cli():
    importers = {relative(p) for p in library_files() if "pipeline.cli" in imported_modules(p)}
    assert importers == set()


def entry_takes(entry: str) -> str:
    """The annotation of the first parameter of ``"module:function"``, read from the module's source."""
    module, _, name = entry.partition(":")
    path = REPO / (module.replace(".", "/") + ".py")
    (function,) = [node for node in ast.parse(path.read_text()).body
                   if isinstance(node, ast.FunctionDef) and node.name == name]
    return ast.unparse(function.args.args[0].annotation)


def test_jobs_parse_a_config_call_one_library_function_and_print_its_summary():
    """A job imports only the runner and names its entry function and config class as "module:name", so --help
    and config errors never import the library behind it (torch, Ray)."""
    for job in sorted((REPO / "jobs").glob("*.py")):
        if job.name == "__init__.py":
            continue
        source = job.read_text()
        assert len(source.splitlines()) < 40, job.name
        tree = ast.parse(source)
        imports = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert [(node.module, [a.name for a in node.names]) for node in imports
                if isinstance(node, ast.ImportFrom)] == [("pipeline.cli", ["run_job"])], job.name
        assert all(isinstance(node, ast.ImportFrom) for node in imports), job.name
        (call,) = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and ast.unparse(node.func) == "run_job"]
        entry, config = call.args[0].value, call.args[1].value
        assert entry_takes(entry) == config.partition(":")[2], (job.name, entry, config)


def test_encoders_selector_and_output_format_load_without_ray_or_the_job_runner():
    probe = ("import sys; import pipeline.encoders, pipeline.selector, pipeline.output.format, "
             "pipeline.output.manifest, pipeline.loader; "
             "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.') or m == 'pipeline.cli'))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
