"""Layering rules: the model is plain PyTorch; the scheduler and client never load PyTorch."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _loaded_after(code: str) -> set[str]:
    script = code + "\nimport sys\nprint(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return {m.split(".")[0] for m in out.stdout.split()}


def test_model_imports_no_service_libraries():
    loaded = _loaded_after("import capvst.model, capvst.stylize, capvst.images")
    assert not loaded & {"celery", "kombu", "redis", "boto3", "botocore"}


def test_scheduler_and_client_do_not_load_torch():
    loaded = _loaded_after("import worker, scheduler.service, scheduler.client, "
                           "scheduler.report, capvst.cli")
    assert "torch" not in loaded


def test_only_the_cli_reaches_into_the_services():
    for path in (REPO / "capvst").rglob("*.py"):
        if path.name in ("cli.py", "cli_jobs.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in ("scheduler", "worker") for n in names), path
