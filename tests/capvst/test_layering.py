"""Layering rules: the model is plain PyTorch; the scheduler and client never load PyTorch;
imports go one way (capvst ← scheduler, capvst ← worker, never between the two services); no
module takes another module's private names."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("capvst", "scheduler", "worker")


def _loaded_after(code: str) -> set[str]:
    script = code + "\nimport sys\nprint(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return {m.split(".")[0] for m in out.stdout.split()}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in a file, relative ones resolved."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((module, [a.name for a in node.names]))
    return out


def _files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_model_imports_no_service_libraries():
    loaded = _loaded_after("import capvst.model, capvst.stylize, capvst.images")
    assert not loaded & {"celery", "kombu", "redis", "boto3", "botocore"}


def test_scheduler_and_client_do_not_load_torch():
    # the worker's parent process too: torch loads in the pool processes, after the fork
    loaded = _loaded_after("import worker, worker.tasks, worker.pipeline, worker.video, "
                           "scheduler.app, scheduler.tasks, scheduler.service, "
                           "scheduler.client, scheduler.report, scheduler.reconciler, "
                           "capvst.cli")
    assert "torch" not in loaded


def test_imports_go_one_way():
    forbidden = {"capvst": {"scheduler", "worker"}, "scheduler": {"worker"},
                 "worker": {"scheduler"}}
    allowed = {"capvst/cli.py", "capvst/cli_jobs.py"}  # the commands start the services
    for package, banned in forbidden.items():
        for path in _files(package):
            if str(path.relative_to(REPO)) in allowed:
                continue
            for module, _names in _imports(path):
                assert module.split(".")[0] not in banned, f"{path}: imports {module}"


def test_no_module_takes_another_modules_private_names():
    for package in PACKAGES:
        for path in _files(package):
            here = ".".join(path.relative_to(REPO).with_suffix("").parts)
            for module, names in _imports(path):
                if module.split(".")[0] not in PACKAGES or module == here:
                    continue
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                assert not private, f"{path}: takes {private} from {module}"


def test_lua_scripts_are_files_not_strings():
    assert sorted(p.name for p in (REPO / "capvst" / "lua").glob("*.lua")) == [
        "advance.lua", "common.lua", "finish.lua", "lease.lua", "record.lua", "uncancel.lua"]
    for path in _files("capvst") + _files("scheduler") + _files("worker"):
        assert "redis.call(" not in path.read_text(), path
