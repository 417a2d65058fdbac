"""URIs, the storage policy, and real reads and create-only writes (moto over HTTP, files)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import capvst.storage as storage_mod
from capvst.errors import (
    AccessDenied,
    InvalidItem,
    NotFound,
    PermanentStorageError,
    StorageError,
    TooLarge,
)
from capvst.settings import Settings
from capvst.storage import Location, Storage, join, parse, resolve

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_capvst_env(monkeypatch):
    """Settings come from the arguments only, never from the developer's environment."""
    for k in list(os.environ):
        if k.startswith("CAPVST_"):
            monkeypatch.delenv(k)


def settings(**kw) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg]


# --- parse -------------------------------------------------------------------------------------

def test_parse_s3():
    loc = parse("s3://bucket/dir/a b.jpg")
    assert loc == Location("s3", "bucket", "dir/a b.jpg")
    assert loc.uri == "s3://bucket/dir/a b.jpg"
    assert loc.name == "a b.jpg"
    assert parse("s3://bucket") == Location("s3", "bucket", "")
    assert parse("s3://bucket/folder/").name == "folder"


def test_parse_files_and_local_paths(tmp_path, monkeypatch):
    assert parse("file:///tmp/x%20y/a.jpg") == Location("file", "", "/tmp/x y/a.jpg")
    assert parse("file://localhost/tmp/a.jpg").path == "/tmp/a.jpg"
    assert parse("/tmp/a/../b.jpg").path == "/tmp/b.jpg"
    monkeypatch.chdir(tmp_path)
    assert parse("rel/a.jpg").path == str(tmp_path / "rel" / "a.jpg")
    assert parse("rel/a.jpg").uri == (tmp_path / "rel" / "a.jpg").as_uri()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse("~/a.jpg").path == str(tmp_path / "a.jpg")


@pytest.mark.parametrize("uri,exc,message", [
    ("", InvalidItem, "empty URI"),
    ("   ", InvalidItem, "empty URI"),
    ("s3:///key.jpg", InvalidItem, "no bucket in"),
    ("file://otherhost/tmp/a.jpg", InvalidItem, "file URIs must be local"),
    ("http://example.com/a.jpg", InvalidItem, r"unsupported URI scheme 'http'"),
    ("gs://b/a.jpg", InvalidItem, r"unsupported URI scheme 'gs'.*use s3://, file://"),
    ("/tmp/a\x00.jpg", InvalidItem, "NUL byte"),
    ("s3://b/../other/a.jpg", AccessDenied, r"'\.\.' is not allowed in object keys"),
    ("s3://b/a/../../x", AccessDenied, r"'\.\.' is not allowed in object keys"),
    ("s3://b/a/..", AccessDenied, r"'\.\.' is not allowed in object keys"),
])
def test_parse_refuses(uri, exc, message):
    with pytest.raises(exc, match=message):
        parse(uri)


def test_parse_keeps_dots_that_are_not_traversal():
    assert parse("s3://b/a/..b/c..").path == "a/..b/c.."
    assert parse("s3://b/./a").path == "./a"


@pytest.mark.parametrize("key", ["photos/img#1.jpg", "photos/what?.jpg"])
def test_parse_keeps_hash_and_question_mark_in_s3_keys(key):
    assert parse(f"s3://b/{key}").path == key


# --- resolve and join --------------------------------------------------------------------------

@pytest.mark.parametrize("ref,base,expected", [
    ("a.jpg", "s3://b/m/manifest.jsonl", "s3://b/m/a.jpg"),
    ("sub/a.jpg", "s3://b/m/manifest.jsonl", "s3://b/m/sub/a.jpg"),
    ("../a.jpg", "s3://b/m/manifest.jsonl", "s3://b/a.jpg"),
    ("x/../a.jpg", "s3://b/manifest.jsonl", "s3://b/a.jpg"),
    ("a.jpg", "s3://b/manifest.jsonl", "s3://b/a.jpg"),
    ("s3://other/a.jpg", "s3://b/m/manifest.jsonl", "s3://other/a.jpg"),
    ("file:///data/a.jpg", "s3://b/m/manifest.jsonl", "file:///data/a.jpg"),
    ("/data/a.jpg", "s3://b/m/manifest.jsonl", "/data/a.jpg"),
    ("a.jpg", "file:///data/m/manifest.csv", "file:///data/m/a.jpg"),
    ("../../x/a.jpg", "file:///data/m/manifest.csv", "file:///x/a.jpg"),
    ("../../../../a.jpg", "file:///data/m/manifest.csv", "file:///a.jpg"),
    ("a b.jpg", "/data/m x/manifest.csv", "file:///data/m%20x/a%20b.jpg"),
    ("a%20b.jpg", "file:///data/manifest.csv", "file:///data/a%2520b.jpg"),  # literal name
])
def test_resolve(ref, base, expected):
    assert resolve(ref, base) == expected


@pytest.mark.parametrize("ref,base", [
    ("../a.jpg", "s3://b/manifest.jsonl"),
    ("../../a.jpg", "s3://b/m/manifest.jsonl"),
    ("x/../../a.jpg", "s3://b/manifest.jsonl"),
    ("..", "s3://b/manifest.jsonl"),
])
def test_resolve_refuses_leaving_the_bucket(ref, base):
    with pytest.raises(AccessDenied, match="points outside the bucket"):
        resolve(ref, base)


def test_resolved_file_uris_parse_back_to_the_normalised_path():
    uri = resolve("../pics/./a b.jpg", "file:///data/m/manifest.csv")
    assert parse(uri).path == "/data/pics/a b.jpg"


@pytest.mark.parametrize("prefix,names,expected", [
    ("s3://b/out", ("a.png",), "s3://b/out/a.png"),
    ("s3://b/out/", ("_capvst", "j1", "report.jsonl"), "s3://b/out/_capvst/j1/report.jsonl"),
    ("s3://b", ("a.png",), "s3://b/a.png"),
    ("file:///tmp/out", ("a b.png",), "file:///tmp/out/a%20b.png"),
    ("/tmp/out/", ("x", "y.png"), "file:///tmp/out/x/y.png"),
])
def test_join(prefix, names, expected):
    assert join(prefix, *names) == expected


# --- policy ------------------------------------------------------------------------------------

def test_allowed_buckets():
    st = Storage(settings(allowed_buckets=" in-bucket , out-bucket,"))
    assert st.check("s3://in-bucket/a.jpg") == Location("s3", "in-bucket", "a.jpg")
    assert st.check("s3://out-bucket/x/y.png").bucket == "out-bucket"
    with pytest.raises(AccessDenied, match=r"bucket 'evil' is not in CAPVST_ALLOWED_BUCKETS"):
        st.check("s3://evil/a.jpg")
    with pytest.raises(AccessDenied, match="not in CAPVST_ALLOWED_BUCKETS"):
        st.check("s3://in-bucket-2/a.jpg")


def test_any_bucket_when_no_allowlist():
    st = Storage(settings(allowed_buckets=" "))
    assert st.check("s3://whatever/a.jpg").bucket == "whatever"


def test_s3_uri_needs_a_key():
    with pytest.raises(InvalidItem, match="no object key"):
        Storage(settings()).check("s3://bucket")


def test_local_paths_refused_without_a_local_root(tmp_path):
    st = Storage(settings())
    for uri in (str(tmp_path / "a.jpg"), (tmp_path / "a.jpg").as_uri(), "relative.jpg"):
        with pytest.raises(AccessDenied, match="local paths are refused here; set "
                                               "CAPVST_LOCAL_ROOT"):
            st.check(uri)


def test_local_paths_allowed_anywhere_when_not_confined(tmp_path):
    st = Storage(settings(), confine_local=False)
    assert st.check(str(tmp_path / "a.jpg")).path == str(tmp_path / "a.jpg")


def test_local_root_confines_paths(tmp_path):
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    (tmp_path / "rootless").mkdir()
    st = Storage(settings(local_root=root))
    assert st.check(str(root / "in" / "a.jpg")).path == str(root / "in" / "a.jpg")
    assert st.check((root / "b.jpg").as_uri()).path == str(root / "b.jpg")
    assert st.check(str(root)).path == str(root)
    for outside in (str(tmp_path / "a.jpg"), str(root / ".." / "a.jpg"),
                    f"{root}/in/../../a.jpg", (root / "x").as_uri() + "/../../a.jpg",
                    str(tmp_path / "rootless" / "a.jpg"), "/etc/passwd"):
        with pytest.raises(AccessDenied, match="is outside CAPVST_LOCAL_ROOT"):
            st.check(outside)


def test_symlink_out_of_the_local_root_is_refused(tmp_path):
    root, secret = tmp_path / "root", tmp_path / "secret"
    root.mkdir()
    secret.mkdir()
    (secret / "key.pem").write_bytes(b"private")
    os.symlink(secret, root / "link")
    os.symlink(secret / "key.pem", root / "file.jpg")
    os.symlink(secret / "not-yet.png", root / "dangling.png")
    st = Storage(settings(local_root=root))
    for uri in (root / "link" / "key.pem", root / "file.jpg", root / "dangling.png"):
        with pytest.raises(AccessDenied, match="is outside CAPVST_LOCAL_ROOT"):
            st.check(str(uri))
    with pytest.raises(AccessDenied):
        st.read(str(root / "file.jpg"))
    with pytest.raises(AccessDenied):
        st.write(str(root / "dangling.png"), b"x", create_only=True)
    assert not (secret / "not-yet.png").exists()


def test_symlink_inside_the_root_resolves_to_its_target(tmp_path):
    root = tmp_path / "root"
    (root / "real").mkdir(parents=True)
    (root / "real" / "a.jpg").write_bytes(b"jpeg")
    os.symlink(root / "real", root / "alias")
    st = Storage(settings(local_root=root))
    assert st.check(str(root / "alias" / "a.jpg")).path == str(root / "real" / "a.jpg")
    assert st.read(str(root / "alias" / "a.jpg")) == b"jpeg"


def test_local_root_that_is_a_symlink(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "root")
    st = Storage(settings(local_root=tmp_path / "root"))
    assert st.check(str(tmp_path / "root" / "a.jpg")).path == str(tmp_path / "real" / "a.jpg")


def test_local_root_of_slash_allows_everything(tmp_path):
    st = Storage(settings(local_root=Path("/")))
    assert st.check(str(tmp_path / "a.jpg")).path == str(tmp_path / "a.jpg")


# --- S3 against moto ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def st3(moto_server, s3):
    """One client for the module (building a boto3 client costs a few hundred ms)."""
    with pytest.MonkeyPatch.context() as mp:
        for k in list(os.environ):
            if k.startswith("CAPVST_"):
                mp.delenv(k)
        return Storage(settings(s3_endpoint_url=moto_server.url, s3_max_attempts=2))


def put(s3, bucket: str, key: str, data: bytes) -> str:
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


def get(s3, bucket: str, key: str) -> bytes:
    return s3.get_object(Bucket=bucket, Key=key)["Body"].read()


def test_s3_read_size_exists_etag(st3, s3, bucket):
    data = os.urandom(3000)
    uri = put(s3, bucket, "in/a.jpg", data)
    assert st3.read(uri) == data
    assert st3.size(uri) == 3000
    assert st3.exists(uri)
    assert st3.etag(uri) == hashlib.md5(data).hexdigest()
    assert st3.read(uri, max_bytes=3000) == data
    put(s3, bucket, "in/a.jpg", b"changed")
    assert st3.etag(uri) == hashlib.md5(b"changed").hexdigest()


def test_s3_missing_object(st3, bucket):
    uri = f"s3://{bucket}/nope.jpg"
    assert st3.size(uri) is None
    assert not st3.exists(uri)
    assert st3.etag(uri) is None
    with pytest.raises(NotFound, match=f"s3://{bucket}/nope.jpg does not exist") as info:
        st3.read(uri)
    assert info.value.code == "not_found"
    with pytest.raises(NotFound):
        list(st3.iter_chunks(uri))


def test_s3_missing_bucket(st3):
    with pytest.raises(NotFound, match="does not exist"):
        st3.read("s3://no-such-bucket-capvst/a.jpg")
    assert st3.size("s3://no-such-bucket-capvst/a.jpg") is None


def test_s3_read_too_large(st3, s3, bucket):
    uri = put(s3, bucket, "big.jpg", b"x" * 1001)
    with pytest.raises(TooLarge, match=r"is over 1,000 bytes") as info:
        st3.read(uri, max_bytes=1000)
    assert info.value.code == "too_large"
    assert st3.read(uri, max_bytes=1001) == b"x" * 1001  # the client is still usable


def test_s3_iter_chunks_from_an_offset(st3, s3, bucket):
    data = bytes(range(256)) * 40  # 10,240 bytes
    uri = put(s3, bucket, "m.jsonl", data)
    assert b"".join(st3.iter_chunks(uri, chunk_size=1000)) == data
    chunks = list(st3.iter_chunks(uri, start=5000, chunk_size=1024))
    assert b"".join(chunks) == data[5000:]
    assert max(len(c) for c in chunks) <= 1024
    assert b"".join(st3.iter_chunks(uri, start=len(data) - 1)) == data[-1:]
    assert list(st3.iter_chunks(uri, start=len(data))) == []
    assert list(st3.iter_chunks(uri, start=len(data) + 100)) == []


def test_s3_iter_chunks_of_an_empty_object(st3, s3, bucket):
    uri = put(s3, bucket, "empty.jsonl", b"")
    assert b"".join(st3.iter_chunks(uri)) == b""
    assert st3.size(uri) == 0 and st3.exists(uri)


def test_s3_iter_uris(st3, s3, bucket):
    keys = ["out/_capvst/j/results/a.jsonl", "out/_capvst/j/results/b.jsonl",
            "out/_capvst/j/results/deep/c.jsonl", "out/_capvst/j/resultsX/no.jsonl",
            "out/x.png"]
    for k in keys:
        put(s3, bucket, k, b"{}")
    got = set(st3.iter_uris(f"s3://{bucket}/out/_capvst/j/results"))
    assert got == {f"s3://{bucket}/{k}" for k in keys[:3]}
    assert set(st3.iter_uris(f"s3://{bucket}/out/_capvst/j/results/")) == got
    assert list(st3.iter_uris(f"s3://{bucket}/nothing-here")) == []


def test_s3_create_only_write_never_overwrites(st3, s3, bucket):
    uri = f"s3://{bucket}/out/a.png"
    assert st3.write(uri, b"first", create_only=True) is True
    assert st3.write(uri, b"second", create_only=True) is False
    assert get(s3, bucket, "out/a.png") == b"first"
    assert st3.write(uri, b"third") is True  # a plain write overwrites
    assert get(s3, bucket, "out/a.png") == b"third"


def test_s3_write_content_type(st3, s3, bucket):
    st3.write(f"s3://{bucket}/r/index.html", b"<html>", content_type="text/html")
    assert s3.head_object(Bucket=bucket, Key="r/index.html")["ContentType"] == "text/html"


def test_s3_write_to_a_missing_bucket(st3):
    with pytest.raises(NotFound):
        st3.write("s3://no-such-bucket-capvst/a.png", b"x", create_only=True)


def test_s3_concurrent_create_only_writes_have_one_winner(st3, s3, bucket):
    uri = f"s3://{bucket}/out/race.png"
    payloads = [bytes([n]) * 200_000 for n in range(8)]
    results: list[bool | None] = [None] * 8
    barrier = threading.Barrier(8)

    def writer(n: int) -> None:
        barrier.wait()
        results[n] = st3.write(uri, payloads[n], create_only=True)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(True) == 1, results
    assert results.count(False) == 7, results
    assert get(s3, bucket, "out/race.png") == payloads[results.index(True)]


MIB = 1024 * 1024


@pytest.fixture
def small_multipart(monkeypatch):
    # moto refuses parts under 5 MiB (but the last) like S3 does: EntityTooSmall
    monkeypatch.setattr(storage_mod, "MULTIPART_THRESHOLD", 6 * MIB)
    monkeypatch.setattr(storage_mod, "MULTIPART_CHUNK", 5 * MIB)


def uploads_in_progress(s3, bucket: str) -> list:
    return s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_s3_multipart_create_only_write(st3, s3, bucket, small_multipart):
    data = os.urandom(11 * MIB)  # parts of 5, 5 and 1 MiB
    other = os.urandom(11 * MIB)
    uri = f"s3://{bucket}/out/big.png"
    assert st3.write(uri, data, create_only=True) is True
    head = s3.head_object(Bucket=bucket, Key="out/big.png")
    assert head["ETag"].strip('"').endswith("-3")  # it really went in three parts
    assert st3.write(uri, other, create_only=True) is False
    assert get(s3, bucket, "out/big.png") == data
    assert uploads_in_progress(s3, bucket) == []  # the losing upload was aborted


def test_s3_multipart_parts_too_small_fail_and_are_aborted(st3, s3, bucket, monkeypatch):
    monkeypatch.setattr(storage_mod, "MULTIPART_THRESHOLD", 1024)
    monkeypatch.setattr(storage_mod, "MULTIPART_CHUNK", 1024)
    with pytest.raises(PermanentStorageError, match="S3 EntityTooSmall writing"):
        st3.write(f"s3://{bucket}/out/small-parts.png", b"x" * 3000, create_only=True)
    assert not st3.exists(f"s3://{bucket}/out/small-parts.png")
    assert uploads_in_progress(s3, bucket) == []


def test_s3_upload_file(st3, s3, bucket, tmp_path):
    src = tmp_path / "report.jsonl"
    src.write_bytes(b'{"line": 1}\n' * 1000)
    uri = f"s3://{bucket}/out/_capvst/j/report.jsonl"
    st3.upload_file(uri, str(src), content_type="application/x-ndjson")
    assert get(s3, bucket, "out/_capvst/j/report.jsonl") == src.read_bytes()
    src.write_bytes(b"replaced")
    st3.upload_file(uri, str(src))  # upload_file overwrites
    assert st3.read(uri) == b"replaced"


def test_s3_upload_file_multipart(st3, s3, bucket, tmp_path, small_multipart):
    src = tmp_path / "big.bin"
    data = os.urandom(7 * MIB)
    src.write_bytes(data)
    st3.upload_file(f"s3://{bucket}/big.bin", str(src))
    assert get(s3, bucket, "big.bin") == data


def test_s3_upload_file_to_a_missing_bucket(st3, tmp_path):
    src = tmp_path / "a.txt"
    src.write_bytes(b"a")
    with pytest.raises(NotFound):
        st3.upload_file("s3://no-such-bucket-capvst/a.txt", str(src))


def test_s3_delete(st3, s3, bucket):
    uri = put(s3, bucket, "d.png", b"x")
    st3.delete(uri)
    assert not st3.exists(uri)
    st3.delete(uri)  # deleting twice is fine


def test_s3_unreachable_endpoint_is_transient(s3):
    from tests.services import free_port

    st = Storage(settings(s3_endpoint_url=f"http://127.0.0.1:{free_port()}", s3_max_attempts=1))
    with pytest.raises(StorageError) as info:
        st.read("s3://b/a.jpg")
    assert info.value.code == "storage_error"


def test_s3_allowlist_applies_before_any_request(moto_server, s3, bucket):
    st = Storage(settings(s3_endpoint_url=moto_server.url, allowed_buckets="other"))
    with pytest.raises(AccessDenied):
        st.write(f"s3://{bucket}/a.png", b"x")
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount") == 0


# --- local files -------------------------------------------------------------------------------

@pytest.fixture
def local(tmp_path) -> Storage:
    return Storage(settings(local_root=tmp_path))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".capvst-*"))


def test_local_read_size_exists_etag(local, tmp_path):
    f = tmp_path / "in" / "a.jpg"
    f.parent.mkdir()
    f.write_bytes(b"12345")
    for uri in (str(f), f.as_uri()):
        assert local.read(uri) == b"12345"
        assert local.size(uri) == 5 and local.exists(uri)
        assert local.read(uri, max_bytes=5) == b"12345"
    st = f.stat()
    assert local.etag(str(f)) == f"{st.st_mtime_ns}-5"
    with pytest.raises(TooLarge, match="is over 4 bytes"):
        local.read(str(f), max_bytes=4)


def test_local_missing_and_directories(local, tmp_path):
    missing = str(tmp_path / "nope.jpg")
    assert local.size(missing) is None and not local.exists(missing)
    assert local.etag(missing) is None
    with pytest.raises(NotFound, match="does not exist"):
        local.read(missing)
    with pytest.raises(NotFound, match="does not exist"):
        list(local.iter_chunks(missing))
    (tmp_path / "dir").mkdir()
    assert local.size(str(tmp_path / "dir")) is None
    with pytest.raises(NotFound, match="is a directory"):
        local.read(str(tmp_path / "dir"))


def test_local_iter_chunks_from_an_offset(local, tmp_path):
    data = os.urandom(10_000)
    (tmp_path / "m.csv").write_bytes(data)
    uri = str(tmp_path / "m.csv")
    assert b"".join(local.iter_chunks(uri, chunk_size=999)) == data
    assert b"".join(local.iter_chunks(uri, start=4321, chunk_size=1000)) == data[4321:]
    assert list(local.iter_chunks(uri, start=20_000)) == []


def test_local_iter_uris_skips_temporary_files(local, tmp_path):
    res = tmp_path / "out" / "_capvst" / "j" / "results"
    (res / "deep").mkdir(parents=True)
    for p in (res / "a.jsonl", res / "deep" / "b.jsonl", res / ".capvst-tmp.123"):
        p.write_bytes(b"{}")
    assert sorted(local.iter_uris(str(res))) == sorted(
        [(res / "a.jsonl").as_uri(), (res / "deep" / "b.jsonl").as_uri()])
    assert list(local.iter_uris(str(tmp_path / "nothing"))) == []


def test_local_create_only_write(local, tmp_path):
    target = tmp_path / "out" / "sub" / "a.png"
    uri = target.as_uri()
    assert local.write(uri, b"first", create_only=True) is True
    assert local.write(uri, b"second", create_only=True) is False
    assert target.read_bytes() == b"first"
    assert local.write(uri, b"third") is True
    assert target.read_bytes() == b"third"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)
    assert leftovers(tmp_path) == []


def test_local_concurrent_create_only_writes_have_one_winner(local, tmp_path):
    target = tmp_path / "out" / "race.png"
    payloads = [bytes([n]) * 500_000 for n in range(8)]
    results: list[bool | None] = [None] * 8
    barrier = threading.Barrier(8)

    def writer(n: int) -> None:
        barrier.wait()
        results[n] = local.write(str(target), payloads[n], create_only=True)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results.count(True) == 1 and results.count(False) == 7, results
    assert target.read_bytes() == payloads[results.index(True)]
    assert leftovers(tmp_path) == []


def test_local_write_onto_a_directory(local, tmp_path):
    (tmp_path / "out" / "a.png").mkdir(parents=True)
    with pytest.raises(PermanentStorageError, match="cannot write"):
        local.write(str(tmp_path / "out" / "a.png"), b"x")
    assert local.write(str(tmp_path / "out" / "a.png"), b"x", create_only=True) is False
    assert (tmp_path / "out" / "a.png").is_dir()
    assert leftovers(tmp_path) == []


def test_local_write_under_a_file_fails(local, tmp_path):
    (tmp_path / "blocker").write_bytes(b"file, not a folder")
    with pytest.raises(PermanentStorageError, match="cannot write to"):
        local.write(str(tmp_path / "blocker" / "a.png"), b"x", create_only=True)
    assert (tmp_path / "blocker").read_bytes() == b"file, not a folder"


_FAILING_WRITE = """
import resource, signal, sys
from capvst.errors import CapvstError
from capvst.settings import Settings
from capvst.storage import Storage

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
st = Storage(Settings(local_root=sys.argv[1]))
try:
    st.write(sys.argv[2], b"x" * 1_000_000, create_only=sys.argv[3] == "1")
except CapvstError as exc:
    print(type(exc).__name__, exc.code, exc.message)
else:
    print("written")
"""


@pytest.mark.parametrize("create_only", [True, False])
def test_failed_local_write_leaves_no_partial_file(tmp_path, create_only):
    # the file-size limit makes the write itself fail after 100 kB went to disk
    target = tmp_path / "out" / "big.png"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPVST_")}
    proc = subprocess.run(
        [sys.executable, "-c", _FAILING_WRITE, str(tmp_path), str(target),
         "1" if create_only else "0"],
        capture_output=True, text=True, timeout=60, cwd=str(REPO), env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("PermanentStorageError storage_error cannot write"), proc.stdout
    assert "File too large" in proc.stdout
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_local_upload_file_and_delete(local, tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_bytes(b"abc" * 1_000_000)
    dst = tmp_path / "out" / "_capvst" / "j" / "report.jsonl"
    local.upload_file(str(dst), str(src))
    assert dst.read_bytes() == src.read_bytes()
    src.write_bytes(b"new")
    local.upload_file(dst.as_uri(), str(src))
    assert dst.read_bytes() == b"new"
    assert leftovers(tmp_path) == []
    local.delete(str(dst))
    assert not dst.exists()
    local.delete(str(dst))


def test_local_writes_respect_the_root(local, tmp_path):
    with pytest.raises(AccessDenied, match="outside CAPVST_LOCAL_ROOT"):
        local.write(str(tmp_path.parent / "escape.png"), b"x", create_only=True)
    assert not (tmp_path.parent / "escape.png").exists()
