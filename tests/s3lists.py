"""S3 Batch Operations CSVs and S3 Inventory reports written the way S3 writes them."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Sequence
from urllib.parse import quote_plus

SCHEMA = ("Bucket", "Key", "VersionId", "IsLatest", "IsDeleteMarker", "Size",
          "LastModifiedDate", "ETag")


def encode_key(key: str) -> str:
    """A key as S3 writes it into these CSVs: URL-encoded, '+' for a space, '/' kept."""
    return quote_plus(key, safe="/")


def batch_csv(rows: Sequence[Sequence[str]]) -> bytes:
    """``bucket,key[,versionId]`` rows (keys given decoded), no header."""
    return "".join(",".join([r[0], encode_key(r[1]), *r[2:]]) + "\n" for r in rows).encode()


def inventory_csv_gz(rows: Sequence[dict[str, str]], schema: Sequence[str] = SCHEMA,
                     members: int = 1) -> bytes:
    """A data file: quoted CSV rows in ``schema`` order, gzip-compressed in ``members``
    gzip members (S3 writes one; concatenated members are valid gzip too)."""
    lines = []
    for r in rows:
        cells = [encode_key(r.get(c, "")) if c == "Key" else r.get(c, "") for c in schema]
        lines.append(",".join(f'"{c}"' for c in cells) + "\n")
    per = max(1, -(-len(lines) // members))
    return b"".join(gzip.compress("".join(lines[i:i + per]).encode())
                    for i in range(0, len(lines), per))


def inventory_manifest(source: str, destination: str, files: dict[str, bytes],
                       schema: Sequence[str] = SCHEMA, file_format: str = "CSV") -> bytes:
    """``manifest.json`` (pretty-printed, as S3 writes it) for data files {key: bytes}."""
    doc = {
        "sourceBucket": source,
        "destinationBucket": f"arn:aws:s3:::{destination}",
        "version": "2016-11-30",
        "creationTimestamp": "1514944800000",
        "fileFormat": file_format,
        "fileSchema": ", ".join(schema),
        "files": [{"key": k, "size": len(v), "MD5checksum": hashlib.md5(v).hexdigest()}
                  for k, v in files.items()],
    }
    return json.dumps(doc, indent=4).encode()
