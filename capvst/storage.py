"""One interface over ``s3://`` object storage and local files (``file://`` or plain paths).

Reads stream; output writes are create-only (an existing object is never overwritten, so a
redelivered task cannot corrupt a finished output); every failure becomes a capvst error with
a code: missing objects ``not_found``, refusals ``access_denied``, passing faults a
:class:`~capvst.errors.StorageError` that callers retry.
"""

from __future__ import annotations

import errno
import os
import posixpath
import re
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, quote_from_bytes, unquote, urlsplit

from .errors import (
    AccessDenied,
    InvalidItem,
    ManifestChanged,
    NotFound,
    PermanentStorageError,
    StorageError,
    TooLarge,
)

if TYPE_CHECKING:
    from .settings import Settings

#: Outputs above this size are written with a (create-only) multipart upload.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
MULTIPART_CHUNK = 16 * 1024 * 1024

_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "OperationAborted",
    "ConditionalRequestConflict", "409", "RequestLimitExceeded", "BadDigest", "IncompleteBody",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NoSuchBucket", "NotFound", "NoSuchUpload"}
_DENIED_CODES = {"AccessDenied", "403", "AllAccessDisabled", "InvalidAccessKeyId",
                 "SignatureDoesNotMatch", "AccountProblem", "InvalidObjectState"}


def file_uri(path: str) -> str:
    """``file://`` URI of an absolute path (what ``Path.as_uri`` gives, without its cost)."""
    return "file://" + quote_from_bytes(os.fsencode(path))


# an object version: ``s3://bucket/key?versionId=V`` (V percent-encoded, so it has no '/')
_VERSION = re.compile(r"\?versionId=([^/?]+)$")


def split_version(uri: str) -> tuple[str, str | None]:
    """``s3://b/k?versionId=V`` as (``s3://b/k``, V); any other URI as (uri, None).

    S3 keys may contain '?', so only this exact suffix is read as a version; a key that
    really ends in ``?versionId=…`` cannot be named without one.
    """
    m = _VERSION.search(uri) if uri.startswith("s3://") else None
    if m is None:
        return uri, None
    return uri[:m.start()], unquote(m.group(1))


def versioned(uri: str, version: str | None) -> str:
    """The URI of one version of an S3 object (``uri`` itself when ``version`` is empty)."""
    return f"{uri}?versionId={quote(version, safe='')}" if version else uri


@dataclass(frozen=True)
class Location:
    """A parsed URI: ``scheme`` is ``s3`` or ``file``; ``path`` is the key or absolute path."""

    scheme: str
    bucket: str
    path: str

    @property
    def uri(self) -> str:
        """Canonical URI."""
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.path}"
        return file_uri(self.path)

    @property
    def name(self) -> str:
        """Last path component."""
        return posixpath.basename(self.path.rstrip("/"))


def parse(uri: str) -> Location:
    """Parse ``s3://bucket/key``, ``file:///abs/path`` or a local path (made absolute)."""
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidItem("empty URI")
    if "\x00" in uri:
        raise InvalidItem("URI contains a NUL byte")
    # split by hand: '#' and '?' are legal in keys and file names, not fragments or queries
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket:
            raise InvalidItem(f"no bucket in {uri!r}")
        key = key.lstrip("/")
        if any(seg == ".." for seg in key.split("/")):
            raise AccessDenied(f"'..' is not allowed in object keys: {uri}")
        return Location("s3", bucket, key)
    if uri.startswith("file://"):
        host, slash, path = uri[len("file://"):].partition("/")
        if host not in ("", "localhost"):
            raise InvalidItem(f"file URIs must be local: {uri!r}")
        path = unquote(slash + path)
        if "\x00" in path:
            raise InvalidItem("URI contains a NUL byte")
        return Location("file", "", os.path.abspath(path))
    parts = urlsplit(uri)
    if parts.scheme and len(parts.scheme) > 1:
        raise InvalidItem(f"unsupported URI scheme {parts.scheme!r} in {uri!r}; "
                          "use s3://, file:// or a local path")
    return Location("file", "", os.path.abspath(os.path.expanduser(uri)))


def resolve(ref: str, base: str) -> str:
    """``ref`` relative to the folder of URI ``base`` (absolute refs are returned as they are)."""
    if ref.startswith(("s3://", "file://")) or os.path.isabs(ref):
        return ref
    scheme = urlsplit(ref).scheme
    if scheme and len(scheme) > 1 and ref.startswith(scheme + "://"):
        return ref  # another scheme: refused with a clear message when parsed
    loc = parse(base)
    if loc.scheme == "s3":
        folder = posixpath.dirname(loc.path)
        joined = posixpath.normpath(posixpath.join(folder, ref) if folder else ref)
        if joined.startswith("../") or joined == "..":
            raise AccessDenied(f"{ref!r} points outside the bucket")
        return f"s3://{loc.bucket}/{joined}"
    return file_uri(os.path.normpath(os.path.join(os.path.dirname(loc.path), ref)))


def join(prefix: str, *names: str) -> str:
    """Append path components to a URI prefix."""
    loc = parse(prefix)
    if loc.scheme == "s3":
        key = posixpath.join(loc.path, *names) if loc.path else posixpath.join(*names)
        return f"s3://{loc.bucket}/{key}"
    return file_uri(os.path.normpath(os.path.join(loc.path, *names)))


def _open_regular(path: str) -> Any:
    """Open a local file for reading, refusing anything but a regular file without blocking
    (a FIFO would block an open() forever, a device could be endless)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist") from None
    except IsADirectoryError:
        raise NotFound(f"{path} is a directory, not a file") from None
    except PermissionError:
        raise AccessDenied(f"permission denied reading {path}") from None
    except OSError as exc:
        raise PermanentStorageError(f"cannot open {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise NotFound(f"{path} is a directory, not a file")
        raise AccessDenied(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


#: Metadata keys of outputs: which job and manifest line wrote them.
META_JOB, META_LINE = "capvst-job", "capvst-line"
_XATTR = "user."


def _client_error_code(exc: Exception) -> str:
    resp = getattr(exc, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code or str(status or "")


class Storage:
    """Reads and writes URIs under the deployment's rules.

    ``confine_local``: local paths must lie under ``settings.local_root`` (workers and the
    scheduler); when false (a user's own command line) any local path may be read.
    """

    def __init__(self, settings: Settings, *, confine_local: bool = True) -> None:
        self.settings = settings
        self.confine_local = confine_local
        self._client: Any = None
        self._lock = threading.Lock()
        root = settings.local_root
        self._root = os.path.realpath(root) if root is not None else None

    # -- policy --------------------------------------------------------------------------------
    def check(self, uri: str) -> Location:
        """Parse ``uri`` and refuse it unless this deployment may touch it."""
        loc = parse(uri)
        if loc.scheme == "s3":
            allow = self.settings.bucket_allowlist
            if allow is not None and loc.bucket not in allow:
                raise AccessDenied(f"bucket {loc.bucket!r} is not in CAPVST_ALLOWED_BUCKETS")
            if not loc.path:
                raise InvalidItem(f"no object key in {uri!r}")
            return loc
        if self.confine_local:
            if self._root is None:
                raise AccessDenied("local paths are refused here; set CAPVST_LOCAL_ROOT to allow "
                                   "a folder")
            real = os.path.realpath(loc.path)
            if real != self._root and not real.startswith(self._root.rstrip(os.sep) + os.sep):
                raise AccessDenied(f"{loc.path} is outside CAPVST_LOCAL_ROOT")
            return Location("file", "", real)
        return loc

    # -- S3 plumbing ---------------------------------------------------------------------------
    @property
    def s3(self) -> Any:
        """The boto3 S3 client, built on first use (after any fork)."""
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                cfg = Config(
                    retries={"mode": self.settings.s3_retry_mode,
                             "total_max_attempts": self.settings.s3_max_attempts},
                    connect_timeout=10, read_timeout=60, max_pool_connections=32,
                    s3={"addressing_style": "path"} if self.settings.s3_endpoint_url else None,
                )
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.settings.s3_endpoint_url, config=cfg)
            return self._client

    def _s3_error(self, exc: Exception, loc: Location, doing: str) -> Exception:
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(exc, ClientError):
            code = _client_error_code(exc)
            if code in _NOT_FOUND_CODES:
                return NotFound(f"{loc.uri} does not exist")
            if code in _DENIED_CODES:
                return AccessDenied(f"access denied {doing} {loc.uri}")
            if code in _TRANSIENT_CODES or code.startswith("5"):
                return StorageError(f"S3 {code} {doing} {loc.uri}")
            return PermanentStorageError(f"S3 {code} {doing} {loc.uri}")
        if isinstance(exc, (BotoCoreError, OSError, ConnectionError)):
            return StorageError(f"{type(exc).__name__} {doing} {loc.uri}")
        return exc

    @staticmethod
    def _object(loc: Location) -> dict[str, Any]:
        """Bucket, Key and, for ``…?versionId=V``, VersionId of a read."""
        m = _VERSION.search(loc.path)
        if m is None:
            return {"Bucket": loc.bucket, "Key": loc.path}
        return {"Bucket": loc.bucket, "Key": loc.path[:m.start()],
                "VersionId": unquote(m.group(1))}

    def _s3_call(self, loc: Location, doing: str, fn: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.s3, fn)(**kwargs)
        except Exception as exc:  # mapped to our tree; unknown errors pass through
            raise self._s3_error(exc, loc, doing) from None

    # -- reads ---------------------------------------------------------------------------------
    def size(self, uri: str) -> int | None:
        """Size in bytes, or None when the object does not exist."""
        loc = self.check(uri)
        if loc.scheme == "file":
            try:
                st = os.stat(loc.path)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise PermanentStorageError(f"cannot stat {loc.path}: {exc.strerror}") from None
            import stat

            return st.st_size if stat.S_ISREG(st.st_mode) else None
        try:
            head = self._s3_call(loc, "checking", "head_object", **self._object(loc))
        except NotFound:
            return None
        return int(head["ContentLength"])

    def exists(self, uri: str) -> bool:
        """Whether the object exists."""
        return self.size(uri) is not None

    def etag(self, uri: str) -> str | None:
        """A version tag for caching (S3 ETag, or mtime and size of a file)."""
        loc = self.check(uri)
        if loc.scheme == "file":
            try:
                st = os.stat(loc.path)
            except OSError:
                return None
            return f"{st.st_mtime_ns}-{st.st_size}"
        try:
            head = self._s3_call(loc, "checking", "head_object", **self._object(loc))
        except NotFound:
            return None
        return str(head.get("ETag", "")).strip('"') or None

    def read(self, uri: str, max_bytes: int | None = None) -> bytes:
        """The whole object; TooLarge above ``max_bytes``."""
        loc = self.check(uri)
        if loc.scheme == "file":
            with _open_regular(loc.path) as fh:
                if max_bytes is not None and os.fstat(fh.fileno()).st_size > max_bytes:
                    raise TooLarge(f"{loc.path} is over {max_bytes:,} bytes")
                try:
                    return bytes(fh.read())
                except OSError as exc:
                    raise PermanentStorageError(f"cannot read {loc.path}: {exc.strerror}"
                                                ) from None
        resp = self._s3_call(loc, "reading", "get_object", **self._object(loc))
        if max_bytes is not None and int(resp.get("ContentLength", 0)) > max_bytes:
            resp["Body"].close()
            raise TooLarge(f"{loc.uri} is over {max_bytes:,} bytes")
        try:
            return bytes(resp["Body"].read())
        except Exception as exc:
            raise self._s3_error(exc, loc, "reading") from None

    def pin(self, uri: str) -> dict[str, Any] | None:
        """What identifies the object's current content (size, ETag and version on S3; size
        and modification time of a file), or None when it does not exist."""
        loc = self.check(uri)
        if loc.scheme == "file":
            try:
                with _open_regular(loc.path) as fh:
                    st = os.fstat(fh.fileno())
            except NotFound:
                return None
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        try:
            head = self._s3_call(loc, "checking", "head_object", **self._object(loc))
        except NotFound:
            return None
        version = head.get("VersionId")
        return {"size": int(head["ContentLength"]),
                "etag": str(head.get("ETag", "")).strip('"') or None,
                "version_id": version if version and version != "null" else None}

    def iter_chunks(self, uri: str, start: int = 0, chunk_size: int = 1 << 16,
                    pin: dict[str, Any] | None = None) -> Iterator[bytes]:
        """The object's bytes from offset ``start``, streamed in chunks.

        With ``pin`` (from :meth:`pin`) the bytes are those the pin names: the pinned
        version of a versioned object, else the object only while its ETag (or a file's size
        and modification time) is unchanged; otherwise :class:`ManifestChanged`.
        """
        loc = self.check(uri)
        if loc.scheme == "file":
            with _open_regular(loc.path) as fh:
                if pin is not None:
                    st = os.fstat(fh.fileno())
                    if (st.st_size, st.st_mtime_ns) != (pin.get("size"), pin.get("mtime_ns")):
                        raise ManifestChanged(f"{loc.path} changed after the job was "
                                              "submitted (size or modification time)")
                fh.seek(start)
                while chunk := fh.read(chunk_size):
                    yield chunk
            return
        kwargs = self._object(loc)
        if start:
            kwargs["Range"] = f"bytes={start}-"
        if pin is not None and pin.get("version_id"):
            kwargs["VersionId"] = pin["version_id"]
        elif pin is not None and pin.get("etag"):
            kwargs["IfMatch"] = pin["etag"]
        try:
            resp = self._s3_call(loc, "reading", "get_object", **kwargs)
        except PermanentStorageError as exc:
            if "InvalidRange" in exc.message:  # start at or past the end
                return
            if "PreconditionFailed" in exc.message or " 412 " in exc.message:
                raise ManifestChanged(f"{loc.uri} changed after the job was submitted "
                                      "(its ETag differs)") from None
            raise
        body = resp["Body"]
        try:
            for chunk in body.iter_chunks(chunk_size):
                yield chunk
        except Exception as exc:
            raise self._s3_error(exc, loc, "reading") from None
        finally:
            body.close()

    def iter_uris(self, prefix: str) -> Iterator[str]:
        """URIs of every object under ``prefix`` (a folder), in no particular order."""
        loc = self.check(prefix)
        if loc.scheme == "file":
            for root, _dirs, files in os.walk(loc.path):
                for f in files:
                    if not f.startswith(".capvst-"):
                        yield file_uri(os.path.join(root, f))
            return
        key = loc.path.rstrip("/") + "/"
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=key)
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield f"s3://{loc.bucket}/{obj['Key']}"
        except Exception as exc:
            raise self._s3_error(exc, loc, "listing") from None

    # -- writes --------------------------------------------------------------------------------
    def write(self, uri: str, data: bytes, *, create_only: bool = False,
              content_type: str = "application/octet-stream",
              metadata: dict[str, str] | None = None) -> bool:
        """Write ``data`` completely or not at all.

        With ``create_only`` an existing object is left alone and False is returned; two
        concurrent writers of the same key leave exactly one complete object. ``metadata``
        (ASCII keys and values) is stored with the object (S3 user metadata, or extended
        attributes of a file where the file system has them): :meth:`metadata` reads it.
        """
        loc = self.check(uri)
        if loc.scheme == "file":
            return self._write_file(loc, data, create_only, metadata)
        if len(data) > MULTIPART_THRESHOLD:
            return self._write_multipart(loc, data, create_only, content_type, metadata)
        kwargs: dict[str, Any] = dict(Bucket=loc.bucket, Key=loc.path, Body=data,
                                      ContentType=content_type)
        if metadata:
            kwargs["Metadata"] = metadata
        if create_only:
            kwargs["IfNoneMatch"] = "*"
        try:
            self.s3.put_object(**kwargs)
        except Exception as exc:
            code = _client_error_code(exc)
            if create_only and code in ("PreconditionFailed", "412"):
                return False
            if create_only and code in ("NotImplemented", "501"):
                # a store without conditional writes: check first (racy, documented)
                if self.exists(uri):
                    return False
                kwargs.pop("IfNoneMatch")
                self._s3_call(loc, "writing", "put_object", **kwargs)
                return True
            raise self._s3_error(exc, loc, "writing") from None
        return True

    def _write_multipart(self, loc: Location, data: bytes, create_only: bool,
                         content_type: str, metadata: dict[str, str] | None = None) -> bool:
        up = self._s3_call(loc, "writing", "create_multipart_upload", Bucket=loc.bucket,
                           Key=loc.path, ContentType=content_type, Metadata=metadata or {})
        upload_id = up["UploadId"]
        try:
            parts = []
            for n, start in enumerate(range(0, len(data), MULTIPART_CHUNK), 1):
                r = self._s3_call(loc, "writing", "upload_part", Bucket=loc.bucket, Key=loc.path,
                                  UploadId=upload_id, PartNumber=n,
                                  Body=data[start:start + MULTIPART_CHUNK])
                parts.append({"ETag": r["ETag"], "PartNumber": n})
            kwargs: dict[str, Any] = dict(Bucket=loc.bucket, Key=loc.path, UploadId=upload_id,
                                          MultipartUpload={"Parts": parts})
            if create_only:
                kwargs["IfNoneMatch"] = "*"
            try:
                self.s3.complete_multipart_upload(**kwargs)
            except Exception as exc:
                if create_only and _client_error_code(exc) in ("PreconditionFailed", "412"):
                    self._abort(loc, upload_id)
                    return False
                raise self._s3_error(exc, loc, "writing") from None
            return True
        except BaseException:
            self._abort(loc, upload_id)
            raise

    def _abort(self, loc: Location, upload_id: str) -> None:
        try:
            self.s3.abort_multipart_upload(Bucket=loc.bucket, Key=loc.path, UploadId=upload_id)
        except Exception:  # best effort; lifecycle rules clean up the rest
            pass

    def metadata(self, uri: str) -> dict[str, str] | None:
        """The metadata an object was written with ({} when none), or None when it does not
        exist."""
        loc = self.check(uri)
        if loc.scheme == "file":
            if not os.path.isfile(loc.path):
                return None
            out: dict[str, str] = {}
            try:
                for name in os.listxattr(loc.path):
                    if name.startswith(_XATTR + "capvst-"):
                        out[name[len(_XATTR):]] = os.getxattr(loc.path, name).decode()
            except OSError:  # a file system without extended attributes
                pass
            return out
        try:
            head = self._s3_call(loc, "checking", "head_object", Bucket=loc.bucket, Key=loc.path)
        except NotFound:
            return None
        return {str(k).lower(): str(v) for k, v in (head.get("Metadata") or {}).items()}

    def _write_file(self, loc: Location, data: bytes, create_only: bool,
                    metadata: dict[str, str] | None = None) -> bool:
        folder = os.path.dirname(loc.path)
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".capvst-", suffix=f".{uuid.uuid4().hex[:6]}",
                                       dir=folder)
        except PermissionError:
            raise AccessDenied(f"cannot write to {folder}: permission denied") from None
        except OSError as exc:
            raise PermanentStorageError(f"cannot write to {folder}: {exc.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
            for k, v in (metadata or {}).items():
                try:
                    os.setxattr(tmp, _XATTR + k, v.encode())
                except OSError:  # no extended attributes here: the output is still complete
                    break
            if create_only:
                try:
                    os.link(tmp, loc.path)  # atomic and fails if the name exists
                except FileExistsError:
                    return False
                return True
            os.replace(tmp, loc.path)
            return True
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageError(f"no space left writing {loc.path}") from None
            raise PermanentStorageError(f"cannot write {loc.path}: {exc.strerror}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def upload_file(self, uri: str, path: str, content_type: str = "application/octet-stream"
                    ) -> None:
        """Copy a local file to ``uri`` (overwriting), streamed; multipart when large."""
        loc = self.check(uri)
        if loc.scheme == "file":
            folder = os.path.dirname(loc.path)
            try:
                os.makedirs(folder, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".capvst-", dir=folder)
                with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                os.chmod(tmp, 0o644)
                os.replace(tmp, loc.path)
            except PermissionError:
                raise AccessDenied(f"cannot write to {folder}: permission denied") from None
            except OSError as exc:
                raise PermanentStorageError(f"cannot write {loc.path}: {exc.strerror}") from None
            return
        from boto3.s3.transfer import TransferConfig

        try:
            self.s3.upload_file(path, loc.bucket, loc.path,
                                ExtraArgs={"ContentType": content_type},
                                Config=TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                                      multipart_chunksize=MULTIPART_CHUNK))
        except Exception as exc:
            # boto3 wraps the real error (S3UploadFailedError) without chaining it
            inner = exc.__cause__ or exc.__context__
            raise self._s3_error(inner if isinstance(inner, Exception) else exc, loc,
                                 "writing") from None

    def delete(self, uri: str) -> None:
        """Remove an object if it exists."""
        loc = self.check(uri)
        if loc.scheme == "file":
            try:
                os.unlink(loc.path)
            except FileNotFoundError:
                pass
            return
        self._s3_call(loc, "deleting", "delete_object", Bucket=loc.bucket, Key=loc.path)
