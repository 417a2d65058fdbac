"""Manifests users already have: telling the formats apart, and S3 Inventory reports.

An S3 Batch Operations CSV is expanded line by line like any manifest
(:func:`capvst.manifest.s3_batch_row`). An S3 Inventory report is a ``manifest.json`` that
lists gzip-compressed CSV data files; :func:`inventory_to_jsonl` streams them (never holding
a data file in memory) into a JSON Lines manifest with one line per listed image, which the
job then runs like any other.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import posixpath
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidItem
from .manifest import FIELDS, SubmitFormat, iter_physical_lines
from .storage import Storage, parse, versioned

#: Bytes read to tell a manifest's format.
SNIFF_BYTES = 64 * 1024
#: Largest ``manifest.json`` read whole (real ones list a few data files: kilobytes).
MAX_INVENTORY_MANIFEST = 16 * 1024 * 1024
#: Extensions of the listed objects an inventory job stylizes; other objects are skipped.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".tif", ".tiff",
                              ".gif", ".bmp"})


# ---------------------------------------------------------------------------------------------
# which format
# ---------------------------------------------------------------------------------------------
def _is_inventory(obj: object) -> bool:
    return isinstance(obj, dict) and "fileFormat" in obj and "files" in obj


def sniff_format(storage: Storage, uri: str) -> SubmitFormat:
    """The format of the manifest at ``uri``, from its first line (and, for a JSON document
    over several lines, from the whole of it):

    - a JSON object with ``fileFormat`` and ``files``: an S3 Inventory ``manifest.json``;
    - another JSON object: JSON Lines;
    - a first CSV line that names a manifest field (``content``, ``style``…): CSV with a
      header;
    - a first CSV line of 2 or 3 cells, none a field name: an S3 Batch Operations CSV.
    """
    head = bytearray()
    for chunk in storage.iter_chunks(uri):
        head += chunk
        if len(head) >= SNIFF_BYTES or b"\n" in head:
            break
    text = bytes(head[:SNIFF_BYTES]).decode("utf-8", errors="replace").lstrip("\ufeff")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    ext = os.path.splitext(parse(uri).path)[1].lower()
    if first.startswith(("{", "[")):
        try:
            obj = json.loads(first)
        except json.JSONDecodeError:
            obj = None
        if obj is None and first.startswith("{"):
            # a JSON document over several lines, as S3 writes manifest.json
            size = storage.size(uri)
            if size is not None and size <= MAX_INVENTORY_MANIFEST:
                try:
                    obj = json.loads(storage.read(uri))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    obj = None
        return "s3-inventory" if _is_inventory(obj) else "jsonl"
    if ext in (".jsonl", ".ndjson", ".json") or not first:
        return "jsonl"
    try:
        cells = [c.strip().lower() for c in next(csv.reader([first]))]
    except csv.Error:
        return "csv"
    if not any(c in FIELDS for c in cells) and 2 <= len(cells) <= 3:
        return "s3-batch"
    return "csv"


# ---------------------------------------------------------------------------------------------
# S3 Inventory
# ---------------------------------------------------------------------------------------------
class InventoryFile(BaseModel):
    """One data file of an inventory report."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    key: str
    size: int | None = None
    md5: str | None = Field(None, alias="MD5checksum")


class InventoryManifest(BaseModel):
    """The fields of an S3 Inventory ``manifest.json`` that locate and describe its data."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    source_bucket: str = Field(alias="sourceBucket")
    destination_bucket: str = Field(alias="destinationBucket")
    file_format: str = Field(alias="fileFormat")
    file_schema: str = Field("", alias="fileSchema")
    files: list[InventoryFile]

    @property
    def bucket(self) -> str:
        """The bucket holding the data files (``destinationBucket`` is an ARN)."""
        return self.destination_bucket.rsplit(":", 1)[-1]

    @property
    def columns(self) -> list[str]:
        """Column names of the data files, in order."""
        return [c.strip() for c in self.file_schema.split(",") if c.strip()]


def read_inventory(storage: Storage, uri: str) -> InventoryManifest:
    """Read and check an inventory's ``manifest.json``; InvalidItem says what is wrong."""
    size = storage.size(uri)
    if size is None:
        raise InvalidItem(f"{uri} does not exist")
    if size > MAX_INVENTORY_MANIFEST:
        raise InvalidItem(f"{uri} is over {MAX_INVENTORY_MANIFEST:,} bytes; not an inventory "
                          "manifest.json")
    try:
        inv = InventoryManifest.model_validate_json(storage.read(uri))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidItem(f"{uri} is not an S3 Inventory manifest.json: {where}: "
                          f"{first.get('msg')}") from None
    if inv.file_format.upper() != "CSV":
        raise InvalidItem(f"{uri}: only CSV inventories can be read, this one is "
                          f"{inv.file_format} (set the inventory's output format to CSV)")
    missing = {"Bucket", "Key"} - set(inv.columns)
    if missing:
        raise InvalidItem(f"{uri}: fileSchema has no {' or '.join(sorted(missing))} column")
    return inv


@dataclass(frozen=True)
class InventoryObject:
    """One listed object: where it is and where it was listed."""

    bucket: str
    key: str
    version: str | None
    delete_marker: bool
    data_file: str
    row: int

    @property
    def uri(self) -> str:
        """``s3://bucket/key``, with ``?versionId=`` when the inventory lists versions."""
        return versioned(f"s3://{self.bucket}/{self.key}", self.version)


def _gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress a gzip stream (of one or more members) chunk by chunk."""
    d = zlib.decompressobj(wbits=31)
    fed = False
    for chunk in chunks:
        while chunk:
            fed = True
            try:
                out = d.decompress(chunk)
            except zlib.error as exc:
                raise InvalidItem(f"not gzip data: {exc}") from None
            if out:
                yield out
            if d.eof:
                chunk, d, fed = d.unused_data, zlib.decompressobj(wbits=31), False
            else:
                chunk = b""
    if fed and not d.eof:
        raise InvalidItem("the gzip data ends early (truncated file)")


def iter_inventory(storage: Storage, inv: InventoryManifest) -> Iterator[InventoryObject]:
    """Every object the inventory lists, data file by data file, streamed; each data file's
    MD5 is checked against the manifest once it has been read."""
    cols = inv.columns
    at = {name: cols.index(name) for name in ("Bucket", "Key", "VersionId", "IsDeleteMarker")
          if name in cols}
    for f in inv.files:
        uri = f"s3://{inv.bucket}/{f.key}"
        md5 = hashlib.md5(usedforsecurity=False)
        try:
            for line in iter_physical_lines(_gunzip(_hashed(storage.iter_chunks(uri), md5))):
                if line.text is None:
                    raise InvalidItem(f"row {line.number}: {line.problem}")
                if not line.text.strip():
                    continue
                row = next(csv.reader([line.text]))
                if len(row) != len(cols):
                    raise InvalidItem(f"row {line.number} has {len(row)} cells, fileSchema "
                                      f"{len(cols)}")
                version = row[at["VersionId"]].strip() if "VersionId" in at else ""
                marker = "IsDeleteMarker" in at and row[at["IsDeleteMarker"]].strip().lower() \
                    == "true"
                yield InventoryObject(
                    bucket=row[at["Bucket"]].strip(), key=_decode_key(row[at["Key"]]),
                    version=version or None, delete_marker=marker, data_file=uri,
                    row=line.number)
        except InvalidItem as exc:
            raise InvalidItem(f"inventory data file {uri}: {exc.message}") from None
        if f.md5 and md5.hexdigest() != f.md5.lower():
            raise InvalidItem(f"inventory data file {uri} does not match the MD5 in the "
                              "manifest (changed or truncated)")


def _hashed(chunks: Iterator[bytes], md5: Any) -> Iterator[bytes]:
    for chunk in chunks:
        md5.update(chunk)
        yield chunk


def _decode_key(cell: str) -> str:
    """Inventory CSVs URL-encode keys (``+`` for a space, as S3 writes them)."""
    return unquote_plus(cell)


@dataclass
class InventoryCounts:
    """What a conversion found."""

    listed: int = 0
    queued: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        """Count one listed object left out."""
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def describe(self) -> str:
        """One line for people."""
        text = f"{self.listed} objects listed, {self.queued} images to stylize"
        if self.skipped:
            text += "; skipped: " + ", ".join(f"{n} {why}" for why, n in
                                              sorted(self.skipped.items()))
        return text


def skip_reason(obj: InventoryObject) -> str | None:
    """Why a listed object is not stylized, or None: delete markers and folder placeholders
    have no content; objects without an image extension are left out."""
    if obj.delete_marker:
        return "delete markers"
    if obj.key.endswith("/"):
        return "folder placeholders"
    ext = posixpath.splitext(obj.key)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        return "without an image extension"
    return None


def inventory_to_jsonl(storage: Storage, uri: str, out: IO[str]) -> InventoryCounts:
    """Write one JSON Lines item (``{"content": "s3://…"}``) per image the inventory at
    ``uri`` lists; the styles come from the job's options."""
    inv = read_inventory(storage, uri)
    counts = InventoryCounts()
    for obj in iter_inventory(storage, inv):
        counts.listed += 1
        why = skip_reason(obj)
        if why:
            counts.skip(why)
            continue
        out.write(json.dumps({"content": obj.uri}, ensure_ascii=False) + "\n")
        counts.queued += 1
    return counts


__all__ = ["IMAGE_EXTENSIONS", "InventoryCounts", "InventoryManifest", "InventoryObject",
           "inventory_to_jsonl", "iter_inventory", "read_inventory", "skip_reason",
           "sniff_format"]
