"""What every ``capvst`` command shares: exit codes, one-line failures, the settings, the
argument parser, and how a service that cannot be reached is reported.

This module imports nothing heavy: usage errors are answered before PyTorch, Celery, boto3
or redis are loaded.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .settings import Settings

EXIT_OK = 0
#: An input, model or job error (one line on stderr).
EXIT_ERROR = 1
#: A usage error, a bad setting, or a manifest that is unusable as a whole.
EXIT_USAGE = 2
#: The job finished, some items failed.
EXIT_FAILED_ITEMS = 3
#: A service (the Redis broker, a Sentinel, S3) is unreachable or refused the credentials.
EXIT_UNREACHABLE = 4

EXIT_CODES_HELP = """\
exit codes:
  0  success
  1  an input, model or job error (one line on stderr)
  2  usage error, bad CAPVST_* setting, or a manifest unusable as a whole
  3  the job finished with failed items
  4  a service is unreachable or refused the credentials (Redis broker or
     Sentinel, S3); the message names which and where
"""

#: Subcommands whose unknown options pass through to ``celery worker``.
PASSTHROUGH = frozenset({"worker", "scheduler"})


class Fail(Exception):
    """A one-line failure with an exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def err(msg: str) -> None:
    """An error line on stderr, prefixed like argparse's."""
    print(f"capvst: error: {msg}", file=sys.stderr, flush=True)


def info(msg: str) -> None:
    """A message for people on stderr (stdout is for results)."""
    print(msg, file=sys.stderr, flush=True)


def load_settings() -> Settings:
    """The settings from the environment; a bad value is a one-line usage failure."""
    from pydantic import ValidationError

    from .settings import Settings

    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        name = f"CAPVST_{where.upper()}" if where != "settings" else "CAPVST_* settings"
        raise Fail(f"bad setting {name}: {first.get('msg')}", EXIT_USAGE) from None


# ---------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse that reports an unknown option with the usage of the subcommand it was given
    to, and hands the unknown options of ``worker``/``scheduler`` (and everything after
    ``--``) to Celery."""

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        argv = list(sys.argv[1:] if args is None else args)
        command = next((a for a in argv if not a.startswith("-")), None)
        verbatim: list[str] = []
        if command in PASSTHROUGH and subparser(self, command) is not None:
            at = argv.index(command)
            if "--" in argv[at + 1:]:
                cut = argv.index("--", at + 1)
                argv, verbatim = argv[:cut], argv[cut + 1:]
        ns, extras = self.parse_known_args(argv, namespace)
        if getattr(ns, "command", None) in PASSTHROUGH:
            ns.celery_args = extras + verbatim
            return ns
        if extras:
            sub = subparser(self, getattr(ns, "command", None)) or self
            sub.error("unrecognized arguments: " + " ".join(extras))
        return ns


def subparser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser | None:
    """The parser of subcommand ``name``, if ``parser`` has one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and name in action.choices:
            return action.choices[name]  # type: ignore[no-any-return]
    return None


def parser_kwargs(**kw: Any) -> dict[str, Any]:
    """Keyword arguments of every (sub)command parser: exit codes in the epilog, kept as
    written."""
    desc = kw.get("description")
    if desc:  # the formatter keeps text as written, so wrap the prose here
        kw["description"] = "\n\n".join(textwrap.fill(" ".join(par.split()), 78)
                                        for par in desc.split("\n\n"))
    epilog = kw.pop("epilog", None)
    kw["epilog"] = (epilog.rstrip() + "\n\n" if epilog else "") + EXIT_CODES_HELP
    kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    return kw


def weights(text: str) -> list[float]:
    """``--style-weights 0.3,0.7``: non-negative numbers with a positive sum."""
    try:
        out = [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be numbers: {text!r}") from None
    if not out or any(x < 0 or x != x or x == float("inf") for x in out) or sum(out) <= 0:
        raise argparse.ArgumentTypeError("weights must be non-negative with a positive sum")
    return out


# ---------------------------------------------------------------------------------------------
# services that cannot be reached
# ---------------------------------------------------------------------------------------------
_URL_PASSWORD = re.compile(r"(://[^:/@;]*:)[^@;]*@")
_REDIS_CONNECT = re.compile(r"Error (-?\d+) connecting to (\S+?)\.\s+(.*?)\.?$")


def _bounded_int(low: int, high: int):  # type: ignore[no-untyped-def]
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return v
    return parse


def add_encoder_arguments(p: argparse.ArgumentParser, default_of: str = "") -> None:
    """``--png-level``, ``--jpeg-quality`` and ``--webp-quality`` (image outputs only)."""
    from .images import DEFAULT_PNG_LEVEL, LOSSY_QUALITY
    from .manifest import ENCODER_FIELDS

    helps = {"png_level": f"zlib level of PNG outputs, 0-9: the same pixels, smaller or faster "
                          f"files (default {DEFAULT_PNG_LEVEL}, fast)",
             "jpeg_quality": f"quality of JPEG outputs, 1-100 (default {LOSSY_QUALITY})",
             "webp_quality": f"quality of WebP outputs, 0-100 (default {LOSSY_QUALITY})"}
    for name, (low, high) in ENCODER_FIELDS.items():
        p.add_argument("--" + name.replace("_", "-"), type=_bounded_int(low, high), default=None,
                       metavar="N", help=default_of + helps[name])


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (fit for messages and logs)."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _has_password(url: str) -> bool:
    return bool(re.search(r"://[^/@;]*:[^@;]+@", url))


def _redis_failure(exc: BaseException, settings: Settings | None) -> str | None:
    import redis
    from redis.sentinel import MasterNotFoundError

    url = settings.broker_url if settings else ""
    where = f" at {mask_url(url)}" if url else ""
    if isinstance(exc, MasterNotFoundError):
        master = settings.sentinel_master if settings else None
        if "AuthenticationError" in str(exc):
            return (f"the Redis Sentinels{where} refused the credentials "
                    "(CAPVST_SENTINEL_PASSWORD)")
        return (f"no Redis Sentinel{where} (CAPVST_BROKER_URL) answers for the master "
                f"{master!r} (CAPVST_SENTINEL_MASTER): none is reachable or none monitors "
                "that name")
    text = str(exc)
    if isinstance(exc, redis.AuthenticationError) or (
            isinstance(exc, redis.ResponseError) and text.startswith(("WRONGPASS", "NOAUTH"))):
        if url and not _has_password(url.split(";")[0]):
            return (f"the broker{where} requires a password; put it in CAPVST_BROKER_URL "
                    "(redis://:PASSWORD@host:port/db)")
        return (f"the broker{where} refused the credentials in CAPVST_BROKER_URL: "
                f"{text.rstrip('.')}")
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        m = _REDIS_CONNECT.search(text)
        if m:
            errno, host, why = int(m.group(1)), m.group(2), m.group(3)
            reason = (f"unknown host {host.rsplit(':', 1)[0]!r} ({why})" if errno < 0
                      else f"{why.lower()} ({host})")
        else:
            reason = text.rstrip(".") or type(exc).__name__
        return f"cannot reach the broker{where} (CAPVST_BROKER_URL): {reason}"
    return None


_S3_DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
              "InvalidClientTokenId", "UnrecognizedClientException"}


def _s3_failure(exc: BaseException, settings: Settings | None) -> str | None:
    from botocore import exceptions as be

    endpoint = (settings.s3_endpoint_url if settings else None) or "AWS"
    if isinstance(exc, (be.NoCredentialsError, be.PartialCredentialsError)):
        return ("no usable AWS credentials for S3 (set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or give the machine a role)")
    if isinstance(exc, (be.EndpointConnectionError, be.ConnectTimeoutError,
                        be.ProxyConnectionError)):
        kwargs = getattr(exc, "kwargs", {})
        if endpoint == "AWS":
            parts = urlsplit(str(kwargs.get("endpoint_url", "")))
            endpoint = f"{parts.scheme}://{parts.netloc}" if parts.netloc else "AWS"
        why = re.search(r"\[Errno (-?\d+)\] ([^\]\)]*)", str(kwargs.get("error", "")))
        reason = ("timed out" if isinstance(exc, be.ConnectTimeoutError) else
                  f"unknown host ({why.group(2)})" if why and int(why.group(1)) < 0 else
                  why.group(2).lower() if why else "could not connect")
        return f"cannot reach S3 at {endpoint} (CAPVST_S3_ENDPOINT_URL): {reason}"
    if isinstance(exc, be.ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _S3_DENIED:
            return f"S3 at {endpoint} refused the credentials ({code})"
    return None


def service_failure(exc: BaseException, settings: Settings | None = None) -> Fail | None:
    """A one-line :class:`Fail` (exit 4) when ``exc`` or what it was raised from is a broker or
    storage connection failure; None otherwise."""
    for e in _chain(exc):
        msg = None
        if "redis" in sys.modules:
            msg = _redis_failure(e, settings)
        if msg is None and "botocore" in sys.modules:
            msg = _s3_failure(e, settings)
        if msg is None and "kombu" in sys.modules:
            from kombu.exceptions import OperationalError

            if isinstance(e, OperationalError) and not (e.__cause__ or e.__context__):
                where = f" at {mask_url(settings.broker_url)}" if settings else ""
                msg = f"cannot reach the broker{where} (CAPVST_BROKER_URL): {e}"
        if msg:
            return Fail(msg, EXIT_UNREACHABLE)
    return None


def check_broker(settings: Settings) -> None:
    """One quick round trip to the broker's Redis, so that a client command answers at once
    (and writes nothing) when it is unreachable or refuses the password."""
    from .jobs import connect

    client = connect(settings.broker_url, retry_seconds=0,
                     sentinel_master=settings.sentinel_master,
                     sentinel_password=settings.sentinel_password)
    try:
        client.ping()
    finally:
        client.close()


def check_s3_credentials(settings: Settings) -> None:
    """Refuse at once when boto3 finds no credentials (the requests would fail anyway, each
    after its retries)."""
    import boto3

    if boto3.session.Session().get_credentials() is None:
        from botocore.exceptions import NoCredentialsError

        fail = _s3_failure(NoCredentialsError(), settings)
        raise Fail(fail or "no AWS credentials", EXIT_UNREACHABLE)


__all__ = ["EXIT_CODES_HELP", "EXIT_ERROR", "EXIT_FAILED_ITEMS", "EXIT_OK", "EXIT_UNREACHABLE",
           "EXIT_USAGE", "PASSTHROUGH", "Fail", "Parser", "check_broker",
           "check_s3_credentials", "err", "info", "load_settings", "mask_url",
           "parser_kwargs", "service_failure", "subparser", "weights"]
