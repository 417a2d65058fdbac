"""Manifests users already have: S3 Batch Operations rows, S3 Inventory reports (on moto's
S3 server), format detection, job-wide styles and key-preserving output names."""

from __future__ import annotations

import gzip
import io
import json

import pytest

from capvst.errors import InvalidItem
from capvst.manifest import JobOptions, build_item, parse_line, s3_batch_row
from capvst.manifest_formats import (
    InventoryCounts,
    inventory_to_jsonl,
    read_inventory,
    sniff_format,
)
from capvst.settings import Settings
from capvst.storage import Storage, split_version, versioned
from tests.s3lists import SCHEMA, encode_key, inventory_csv_gz, inventory_manifest

STYLE = "s3://styles/painting.jpg"
KEYS = JobOptions(styles=[STYLE], output_layout="keys")


# ---------------------------------------------------------------------------------------------
# S3 Batch Operations rows
# ---------------------------------------------------------------------------------------------
def test_batch_row_decodes_the_key_and_keeps_the_version():
    assert s3_batch_row("photos,2024/a+b%2Bc%C3%A9.jpg") == {
        "content": "s3://photos/2024/a b+cé.jpg"}
    row = s3_batch_row("photos,x.jpg,3/L4kq+rmSp")
    assert row == {"content": "s3://photos/x.jpg?versionId=3%2FL4kq%2BrmSp"}
    assert split_version(row["content"]) == ("s3://photos/x.jpg", "3/L4kq+rmSp")
    assert s3_batch_row('"photos","quoted.jpg",""') == {"content": "s3://photos/quoted.jpg"}


@pytest.mark.parametrize("text,needle", [
    ("photos", "has 1 cells"),
    ("photos,a.jpg,v1,extra", "has 4 cells"),
    (",a.jpg", "needs a bucket and a key"),
    ("photos,", "needs a bucket and a key"),
    ("photos,2024/", "folder placeholder"),
])
def test_bad_batch_rows_fail_alone(text, needle):
    with pytest.raises(InvalidItem, match=needle):
        parse_line(text, "s3-batch")


def test_batch_rows_become_items_with_the_job_styles_and_key_folders():
    raw = parse_line(f"photos,{encode_key('2024/summer/IMG 01.JPG')},v9", "s3-batch")
    item = build_item(raw, 7, "s3://lists/manifest.csv", "s3://out/run", KEYS)
    assert item.line == 7
    assert item.content == "s3://photos/2024/summer/IMG 01.JPG?versionId=v9"
    assert item.styles == [STYLE] and item.style_weights is None
    assert item.output == "s3://out/run/2024/summer/IMG 01__painting.png"


def test_flat_layout_and_weights_from_the_job():
    opts = JobOptions(styles=[STYLE, "s3://styles/b.png"], style_weights=[0.25, 0.75])
    item = build_item({"content": "s3://p/a/b/c.jpg"}, 1, "s3://l/m.jsonl", "s3://o", opts)
    assert item.styles == [STYLE, "s3://styles/b.png"] and item.style_weights == [0.25, 0.75]
    assert item.output == "s3://o/c__painting+b.png"


def test_a_line_with_its_own_style_keeps_it():
    raw = {"content": "a.jpg", "style": "s.jpg"}
    item = build_item(raw, 1, "s3://l/m.jsonl", "s3://o", KEYS)
    assert item.styles == ["s3://l/s.jpg"] and item.style_weights is None


def test_without_job_styles_a_line_needs_a_style():
    with pytest.raises(InvalidItem, match="missing field 'style'"):
        build_item({"content": "s3://p/a.jpg"}, 1, "s3://l/m.csv", "s3://o", JobOptions())


@pytest.mark.parametrize("kw", [dict(styles=[]), dict(styles=[" "]),
                                dict(style_weights=[1.0]),
                                dict(styles=["a", "b"], style_weights=[1.0]),
                                dict(styles=["a"], style_weights=[-1.0])])
def test_job_styles_are_checked(kw):
    with pytest.raises(ValueError):
        JobOptions(**kw)


# ---------------------------------------------------------------------------------------------
# telling formats apart
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,text,fmt", [
    ("m.jsonl", '{"content": "a.jpg", "style": "b.jpg"}\n', "jsonl"),
    ("m.csv", '{"content": "a.jpg", "style": "b.jpg"}\n', "jsonl"),
    ("m.csv", "content,style\na.jpg,b.jpg\n", "csv"),
    ("m.csv", "id,content,style\n", "csv"),
    ("m.txt", "\n\nstyle,content\n", "csv"),
    ("m.csv", "photos,a.jpg\nphotos,b.jpg\n", "s3-batch"),
    ("list", "photos,a.jpg,v1\n", "s3-batch"),
    ("m.csv", "a,b,c,d\n", "csv"),
    ("m.jsonl", "", "jsonl"),
    ("manifest.json", json.dumps({"fileFormat": "CSV", "files": []}, indent=2), "s3-inventory"),
    ("manifest.json", json.dumps({"fileFormat": "CSV", "files": []}), "s3-inventory"),
    ("other.json", json.dumps({"content": "x"}, indent=2), "jsonl"),
])
def test_sniff_format(tmp_path, name, text, fmt):
    path = tmp_path / name
    path.write_text(text)
    assert sniff_format(Storage(Settings(), confine_local=False), str(path)) == fmt


# ---------------------------------------------------------------------------------------------
# S3 Inventory on the S3 server
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def storage(moto_server):
    return Storage(Settings(s3_endpoint_url=moto_server.url))


ROWS = [
    {"Bucket": "src", "Key": "2024/a.jpg", "Size": "10"},
    {"Bucket": "src", "Key": "2024/", "Size": "0"},                       # folder placeholder
    {"Bucket": "src", "Key": "notes/readme.txt", "Size": "5"},            # not an image
    {"Bucket": "src", "Key": "2024/b c+d.PNG", "VersionId": "v2", "Size": "9"},
    {"Bucket": "src", "Key": "2024/gone.jpg", "VersionId": "v3", "IsDeleteMarker": "true"},
    {"Bucket": "src", "Key": "ü/é.webp", "Size": "7"},
]


def _publish(s3, bucket, rows, members=1, schema=SCHEMA, fmt="CSV", corrupt=None):
    data = inventory_csv_gz(rows, schema, members)
    files = {"inv/src/cfg/data/part-0.csv.gz": data,
             "inv/src/cfg/data/part-1.csv.gz": inventory_csv_gz(rows[:1], schema)}
    manifest = inventory_manifest("src", bucket, files, schema, fmt)
    for key, body in files.items():
        s3.put_object(Bucket=bucket, Key=key, Body=corrupt(body) if corrupt else body)
    s3.put_object(Bucket=bucket, Key="inv/src/cfg/2024-01-01T00-00Z/manifest.json",
                  Body=manifest)
    return f"s3://{bucket}/inv/src/cfg/2024-01-01T00-00Z/manifest.json"


@pytest.mark.parametrize("members", [1, 3])
def test_inventory_becomes_one_line_per_listed_image(s3, bucket, storage, members):
    uri = _publish(s3, bucket, ROWS, members)
    assert sniff_format(storage, uri) == "s3-inventory"
    out = io.StringIO()
    counts = inventory_to_jsonl(storage, uri, out)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines == [{"content": "s3://src/2024/a.jpg"},
                     {"content": versioned("s3://src/2024/b c+d.PNG", "v2")},
                     {"content": "s3://src/ü/é.webp"},
                     {"content": "s3://src/2024/a.jpg"}]   # the second data file
    assert counts == InventoryCounts(listed=7, queued=4, skipped={
        "folder placeholders": 1, "without an image extension": 1, "delete markers": 1})
    assert "7 objects listed, 4 images to stylize" in counts.describe()


def test_inventory_without_version_columns(s3, bucket, storage):
    schema = ("Bucket", "Key", "Size")
    uri = _publish(s3, bucket, [{"Bucket": "src", "Key": "x.jpg", "Size": "1"}], schema=schema)
    out = io.StringIO()
    inventory_to_jsonl(storage, uri, out)
    assert out.getvalue().splitlines()[0] == '{"content": "s3://src/x.jpg"}'


def test_inventory_data_file_that_changed_is_refused(s3, bucket, storage):
    uri = _publish(s3, bucket, ROWS, corrupt=lambda b: b[:-8] + b"\0" * 8)
    with pytest.raises(InvalidItem, match="part-0.csv.gz"):
        inventory_to_jsonl(storage, uri, io.StringIO())


def test_truncated_inventory_data_file_is_refused(s3, bucket, storage):
    uri = _publish(s3, bucket, ROWS, corrupt=lambda b: b[: len(b) // 2])
    with pytest.raises(InvalidItem, match="truncated|MD5"):
        inventory_to_jsonl(storage, uri, io.StringIO())


def test_orc_inventories_and_bad_schemas_are_refused(s3, bucket, storage):
    uri = _publish(s3, bucket, ROWS, fmt="ORC")
    with pytest.raises(InvalidItem, match="only CSV inventories"):
        read_inventory(storage, uri)
    uri = _publish(s3, bucket, ROWS, schema=("Bucket", "Size"))
    with pytest.raises(InvalidItem, match="no Key column"):
        read_inventory(storage, uri)
    s3.put_object(Bucket=bucket, Key="not.json", Body=b'{"fileFormat": "CSV", "files": 3}')
    with pytest.raises(InvalidItem, match="not an S3 Inventory manifest.json"):
        read_inventory(storage, f"s3://{bucket}/not.json")


def test_rows_that_do_not_fit_the_schema_are_refused(s3, bucket, storage):
    data = b"".join([inventory_csv_gz(ROWS[:1]), gzip.compress(b'"src"\n')])
    s3.put_object(Bucket=bucket, Key="d.csv.gz", Body=data)
    s3.put_object(Bucket=bucket, Key="m.json", Body=inventory_manifest(
        "src", bucket, {"d.csv.gz": data}))
    with pytest.raises(InvalidItem, match="row 2 has 1 cells"):
        inventory_to_jsonl(storage, f"s3://{bucket}/m.json", io.StringIO())


# ---------------------------------------------------------------------------------------------
# reading one version of an object
# ---------------------------------------------------------------------------------------------
def test_versioned_reads(s3, bucket, storage):
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    v1 = s3.put_object(Bucket=bucket, Key="k?x.jpg", Body=b"first")["VersionId"]
    s3.put_object(Bucket=bucket, Key="k?x.jpg", Body=b"second!")
    plain = f"s3://{bucket}/k?x.jpg"
    old = versioned(plain, v1)
    assert storage.read(plain) == b"second!"
    assert storage.read(old) == b"first"
    assert b"".join(storage.iter_chunks(old)) == b"first"
    assert b"".join(storage.iter_chunks(old, start=2)) == b"rst"
    assert storage.size(old) == 5 and storage.size(plain) == 7
    assert storage.etag(old) != storage.etag(plain)
    assert split_version(plain) == (plain, None)
    assert split_version("file:///a?versionId=1") == ("file:///a?versionId=1", None)
