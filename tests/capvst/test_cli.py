"""The command line itself: help texts, usage errors, Celery pass-through and one-line errors
with exit code 4 when Redis or S3 cannot be used (real redis-server, real closed ports)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capvst import cli_jobs
from capvst.cli import _parser, _run
from capvst.cli_common import EXIT_UNREACHABLE, subparser
from tests.services import AWS_ENV, RedisServer, free_port

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "celery", "kombu", "boto3", "botocore", "redis")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPVST_", "AWS_"))}
    env.update(AWS_ENV)
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _capvst(*args: str, env: dict[str, str] | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "capvst", *args], capture_output=True,
                          text=True, env=env or _env(), cwd=str(REPO), timeout=timeout)


def _one_line(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("capvst: error: "), line
    assert "Traceback" not in proc.stderr and "unexpected" not in line, line
    for n in needles:
        assert n in line, line
    return line


# ---------------------------------------------------------------------------------------------
# help
# ---------------------------------------------------------------------------------------------
def test_every_argument_of_every_subcommand_is_described():
    subs = _subcommands()
    assert {"stylize", "submit", "status", "report", "cancel", "resume", "worker", "scheduler",
            "examples"} <= set(subs)
    submit = cli_jobs.submit_parser()
    for name, p in [*subs.items(), ("capvst-submit", submit)]:
        assert p.description, name
        assert "exit codes:" in (p.epilog or "") and "4  a service" in p.epilog, name
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
            assert len(action.help) > 10, (name, action.dest, action.help)


@pytest.mark.parametrize("command,queue", [("worker", "capvst.stylize"),
                                           ("scheduler", "capvst.schedule")])
def test_worker_and_scheduler_print_their_own_help(command, queue):
    proc = _capvst(command, "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"usage: capvst {command} ")
    assert "Usage: python -m celery" not in out and "Start worker instance" not in out
    for needle in ("--hostname", "--concurrency", "--loglevel", f"capvst {command} -- --help",
                   f"-Q {queue}", "CAPVST_BROKER_URL", "CAPVST_SENTINEL_MASTER",
                   "exit codes:"):
        assert needle in out, needle
    if command == "worker":
        assert "CAPVST_CHECKPOINT_PHOTOREALISTIC" in out and "CAPVST_WORKER_MODES" in out


def test_help_of_job_commands_describes_job_and_json(capsys):
    with pytest.raises(SystemExit) as e:
        _run(["status", "--help"], _parser)
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "JOB         the job id that capvst-submit printed" in out
    assert "--json      print one JSON object on stdout" in out


# ---------------------------------------------------------------------------------------------
# usage errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["stylize", "a.jpg", "--style", "s.jpg", "-o", "x.png", "--bogus"],
    ["submit", "m.jsonl", "--bogus"],
    ["status", "JOB", "--bogus"],
    ["report", "JOB", "--bogus"],
    ["cancel", "JOB", "--bogus"],
    ["resume", "JOB", "--bogus"],
    ["examples", "DIR", "--bogus"],
    ["worker", "--concurrency", "zero"],
    ["scheduler", "--loglevel", "LOUD"],
])
def test_a_bad_option_shows_the_subcommand_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _run(argv, _parser)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: capvst {argv[0]} "), err
    assert f"capvst {argv[0]}: error:" in err


def test_capvst_submit_shows_its_own_usage(capsys):
    with pytest.raises(SystemExit) as e:
        _run(["m.jsonl", "--bogus"], cli_jobs.submit_parser)
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("usage: capvst-submit ")


def test_usage_errors_load_nothing_heavy():
    code = ("import sys\nfrom capvst.cli import main\n"
            "for argv in (['stylize', 'a.jpg', '--bogus'], ['submit'], ['status', 'J', '-x'],"
            " ['worker', '-c', 'x'], ['nope']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n"
            "        assert e.code == 2, (argv, e.code)\n"
            "print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), cwd=str(REPO), timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded = set(proc.stdout.split())
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_usage_errors_answer_within_a_second():
    best = float("inf")
    for _ in range(3):  # the best of three: a shared machine may stall one run
        t0 = time.perf_counter()
        proc = _capvst("stylize", "a.jpg", "--style", "s.jpg", "-o", "x.png", "--bogus")
        best = min(best, time.perf_counter() - t0)
        assert proc.returncode == 2 and "usage: capvst stylize" in proc.stderr
    assert best < 1.0, f"a usage error took {best:.2f} s"


# ---------------------------------------------------------------------------------------------
# Celery's options pass through
# ---------------------------------------------------------------------------------------------
def _celery_argv(monkeypatch, argv):
    seen: list[list[str]] = []
    monkeypatch.setattr(cli_jobs, "_celery", lambda a: seen.append(a) or 0)
    assert _run(argv, _parser) == 0
    return seen[0]


def test_worker_defaults_and_passthrough(monkeypatch):
    argv = _celery_argv(monkeypatch, ["worker", "-n", "w1@%h", "--loglevel", "info",
                                      "--without-gossip", "--pool", "solo", "-Ofair",
                                      "--", "--max-tasks-per-child", "5", "-c"])
    assert argv == ["-A", "worker", "worker", "-Q", "capvst.stylize", "-E", "--concurrency", "1",
                    "--hostname",
                    "w1@%h", "--loglevel", "INFO", "--prefetch-multiplier", "1",
                    "--without-gossip", "--pool", "solo", "-Ofair", "--max-tasks-per-child",
                    "5", "-c"]


def test_scheduler_defaults(monkeypatch):
    argv = _celery_argv(monkeypatch, ["scheduler"])
    assert argv == ["-A", "scheduler.app", "worker", "-Q", "capvst.schedule", "-E",
                    "--concurrency", "2",
                    "--hostname", "scheduler@%h", "--loglevel", "INFO",
                    "--prefetch-multiplier", "1"]
    argv = _celery_argv(monkeypatch, ["scheduler", "-c", "3", "--", "--help"])
    assert argv[6:8] == ["--concurrency", "3"] and argv[-1] == "--help"


def test_subparser_lookup():
    assert subparser(_parser(), "stylize").prog == "capvst stylize"
    assert subparser(_parser(), "nope") is None


# ---------------------------------------------------------------------------------------------
# services that cannot be used: one line, exit 4
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-pw"), password="s3cret-pw").start()
    yield server
    server.stop()


def test_wrong_broker_password(locked_redis):
    url = f"redis://:wrong@127.0.0.1:{locked_redis.port}/0"
    proc = _capvst("status", "JOB", env=_env(CAPVST_BROKER_URL=url))
    line = _one_line(proc, EXIT_UNREACHABLE, "refused the credentials", "CAPVST_BROKER_URL",
                     f"127.0.0.1:{locked_redis.port}")
    assert "wrong" not in line  # the password is masked


def test_missing_broker_password(locked_redis):
    url = f"redis://127.0.0.1:{locked_redis.port}/0"
    proc = _capvst("cancel", "JOB", env=_env(CAPVST_BROKER_URL=url))
    _one_line(proc, EXIT_UNREACHABLE, "requires a password", "CAPVST_BROKER_URL")


def test_right_password_reaches_the_job_store(locked_redis):
    proc = _capvst("status", "JOB", env=_env(CAPVST_BROKER_URL=locked_redis.url))
    _one_line(proc, 1, "job JOB is not in Redis")


def test_closed_broker_port_and_nothing_written(tmp_path):
    port = free_port()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"content": "a.jpg", "style": "b.jpg"}\n')
    env = _env(CAPVST_BROKER_URL=f"redis://127.0.0.1:{port}/0")
    proc = _capvst("submit", str(manifest), "--output", str(tmp_path / "out"), env=env)
    _one_line(proc, EXIT_UNREACHABLE, "cannot reach the broker", f"127.0.0.1:{port}",
              "connection refused")
    assert not (tmp_path / "out").exists()
    proc = _capvst("status", "JOB", env=env)
    _one_line(proc, EXIT_UNREACHABLE, "cannot reach the broker")


def test_unknown_broker_host():
    proc = _capvst("status", "JOB", env=_env(CAPVST_BROKER_URL="redis://nohost.invalid:6379/0"))
    _one_line(proc, EXIT_UNREACHABLE, "cannot reach the broker", "unknown host",
              "nohost.invalid")


def test_s3_endpoint_down(locked_redis):
    port = free_port()
    env = _env(CAPVST_BROKER_URL=locked_redis.url, CAPVST_TASK_MAX_RETRIES="0",
               CAPVST_S3_MAX_ATTEMPTS="1",
               CAPVST_S3_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    proc = _capvst("submit", "s3://bucket/jobs/m.jsonl", env=env)
    _one_line(proc, EXIT_UNREACHABLE, f"cannot reach S3 at http://127.0.0.1:{port}",
              "CAPVST_S3_ENDPOINT_URL", "connection refused")


def test_no_s3_credentials(locked_redis, tmp_path):
    env = _env(CAPVST_BROKER_URL=locked_redis.url, CAPVST_S3_ENDPOINT_URL="http://127.0.0.1:9",
               AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    t0 = time.perf_counter()
    proc = _capvst("submit", "s3://bucket/jobs/m.jsonl", env=env)
    _one_line(proc, EXIT_UNREACHABLE, "no usable AWS credentials")
    assert time.perf_counter() - t0 < 10  # refused at once, not after the retries


def test_a_sentinel_url_needs_the_master_name():
    proc = _capvst("status", "JOB", env=_env(CAPVST_BROKER_URL="sentinel://127.0.0.1:26379"))
    _one_line(proc, 2, "CAPVST_SENTINEL_MASTER")


def test_submit_warns_about_local_paths_outside_the_local_root(locked_redis, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"content": "a.jpg", "style": "b.jpg"}\n')
    env = _env(CAPVST_BROKER_URL=locked_redis.url, CAPVST_LOCAL_ROOT=str(tmp_path / "root"))
    proc = _capvst("submit", str(manifest), "--output", str(tmp_path / "out"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "capvst: warning:" in proc.stderr and "CAPVST_LOCAL_ROOT" in proc.stderr
    env["CAPVST_LOCAL_ROOT"] = str(tmp_path)
    proc = _capvst("submit", str(manifest), env=env)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr


def test_style_weights_need_as_many_styles(capsys):
    assert _run(["submit", "m.jsonl", "--style", "a.jpg", "--style-weights", "1,2"],
                _parser) == 2
    assert "2 --style-weights for 1 --style" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["submit", "m.jsonl", "--png-level", "10"],
    ["submit", "m.jsonl", "--jpeg-quality", "high"],
    ["stylize", "a.png", "--style", "s.png", "-o", "o.png", "--webp-quality", "101"],
])
def test_encoder_flags_are_checked(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _run(argv, _parser)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "must be between" in err or "not a whole number" in err
