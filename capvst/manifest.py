"""Manifest schema and streaming parser (DESIGN.md §5).

A manifest is JSON Lines, CSV with a header, or an S3 Batch Operations CSV (``bucket,key``
or ``bucket,key,versionId`` without a header; each listed object a content, the styles from
the job's options). It is read line by line from a byte offset, so
a manifest of millions of lines is never held in memory and expansion can stop and restart
anywhere. Every line that is not blank yields either an :class:`Item` or an
:class:`ItemError`; a bad line never stops the others.
"""

from __future__ import annotations

import csv
import json
import math
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote_plus

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import AccessDenied, CapvstError, InvalidItem
from .images import DEFAULT_MAX_SIZE, MIN_SIDE, OUTPUT_FORMATS, OutputFormat
from .storage import join, parse, resolve, split_version, versioned
from .types import SUBMIT_FORMATS as SUBMIT_FORMATS  # re-exported
from .types import Mode
from .types import SubmitFormat as SubmitFormat  # re-exported
from .video.encode import VIDEO_FORMATS, VideoFormat, output_spec
from .video.media import VIDEO_EXTENSIONS

#: Longest accepted manifest line in bytes; longer lines fail alone (and are never buffered).
MAX_LINE_BYTES = 64 * 1024
#: Largest accepted ``max_size``.
MAX_MAX_SIZE = 8192
#: Folder under the output prefix that belongs to capvst (reports, job records).
RESERVED = "_capvst"
FIELDS = ("content", "style", "style_weights", "alpha_c", "mode", "max_size", "tile",
          "content_mask", "style_mask", "output", "format", "png_level", "jpeg_quality",
          "webp_quality", "id")
#: Encoder settings of image outputs (a line's, else the job's, else the encoder's default):
#: the field and its inclusive range.
ENCODER_FIELDS = {"png_level": (0, 9), "jpeg_quality": (1, 100), "webp_quality": (0, 100)}
#: A line's ``format``: an image format, or a video's (mp4, webm, frames).
ItemFormat = Literal["png", "jpg", "webp", "mp4", "webm", "frames"]
#: Smallest tile side a manifest may ask for.
MIN_TILE = 64
#: ``auto`` (tiled when the image does not fit the worker's memory budget), ``off``, or the
#: side of a tile in pixels.
Tile = Literal["auto", "off"] | int


def _check_max_size(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("must be a number, not true/false")
    if isinstance(v, int) and v != 0 and not MIN_SIDE <= v <= MAX_MAX_SIZE:
        raise ValueError(f"must be 0 (full resolution) or between {MIN_SIDE} and "
                         f"{MAX_MAX_SIZE}")
    return v


def _no_booleans(v: Any) -> Any:
    """JSON's true/false are not numbers (pydantic would take them as 1 and 0)."""
    if isinstance(v, bool) or (isinstance(v, list) and any(isinstance(x, bool) for x in v)):
        raise ValueError("must be a number, not true/false")
    return v


def _check_tile(v: Any) -> Any:
    if v is None:
        return v
    if isinstance(v, bool):
        raise ValueError("must be auto, off or a side in pixels, not true/false")
    if isinstance(v, str):
        text = v.strip().lower()
        if text in ("auto", "off"):
            return text
        try:
            v = int(text)
        except ValueError:
            raise ValueError("must be auto, off or a side in pixels") from None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or v < MIN_TILE:
        raise ValueError(f"must be auto, off or a side of at least {MIN_TILE} pixels")
    return v
#: Formats the scheduler expands line by line.
ManifestFormat = Literal["jsonl", "csv", "s3-batch"]


class JobOptions(BaseModel):
    """Job-wide defaults from the command line; a manifest line overrides them."""

    model_config = ConfigDict(extra="forbid")
    mode: Mode = "photorealistic"
    #: Long-edge limit; 0 is full resolution.
    max_size: int = DEFAULT_MAX_SIZE
    tile: Tile = "auto"
    format: OutputFormat = "png"
    #: Encoder settings of image outputs (None: the encoder's defaults, ``images.encode``).
    png_level: int | None = Field(None, ge=0, le=9)
    jpeg_quality: int | None = Field(None, ge=1, le=100)
    webp_quality: int | None = Field(None, ge=0, le=100)
    #: Style(s) of every line that names none (lists of objects: S3 Batch, S3 Inventory).
    styles: list[str] | None = None
    #: Mixing weights of ``styles``, one per style.
    style_weights: list[float] | None = None
    #: Default output names: ``flat`` is ``{prefix}/{content stem}__{style stems}.{format}``;
    #: ``keys`` keeps an S3 content's key folders: ``{prefix}/{key folders}/{stem}__…``.
    output_layout: Literal["flat", "keys"] = "flat"

    _max_size = field_validator("max_size", mode="after")(_check_max_size)
    _tile = field_validator("tile", mode="before")(_check_tile)
    _encoder = field_validator(*ENCODER_FIELDS, mode="before")(_no_booleans)

    @model_validator(mode="after")
    def _job_styles(self) -> JobOptions:
        if self.styles is not None and (not self.styles or any(not s.strip()
                                                               for s in self.styles)):
            raise ValueError("styles must be a non-empty list of URIs")
        if self.style_weights is not None:
            if not self.styles or len(self.style_weights) != len(self.styles):
                raise ValueError(f"{len(self.style_weights)} style weights for "
                                 f"{len(self.styles or [])} styles")
            if any(w < 0 or w != w or w == float("inf") for w in self.style_weights) \
                    or sum(self.style_weights) <= 0:
                raise ValueError("style weights must be non-negative with a positive sum")
        return self


class LineSpec(BaseModel):
    """One manifest line as written (before URIs are resolved)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    content: str = Field(min_length=1)
    style: str | list[str]
    style_weights: list[float] | None = None
    alpha_c: float | None = Field(None, ge=0.0, le=1.0)
    mode: Mode | None = None
    max_size: int | None = None
    tile: Tile | None = None
    content_mask: str | None = None
    style_mask: str | None = None
    output: str | None = None
    format: ItemFormat | None = None
    png_level: int | None = Field(None, ge=0, le=9)
    jpeg_quality: int | None = Field(None, ge=1, le=100)
    webp_quality: int | None = Field(None, ge=0, le=100)
    id: str | None = Field(None, max_length=512)

    _numbers = field_validator("alpha_c", "max_size", "style_weights", *ENCODER_FIELDS,
                               mode="before")(_no_booleans)

    _max_size = field_validator("max_size", mode="after")(_check_max_size)
    _tile = field_validator("tile", mode="before")(_check_tile)

    @field_validator("style")
    @classmethod
    def _styles(cls, v: str | list[str]) -> str | list[str]:
        items = [v] if isinstance(v, str) else v
        if not items or any(not isinstance(s, str) or not s.strip() for s in items):
            raise ValueError("style must be a URI or a non-empty list of URIs")
        return v

    @field_validator("style_weights")
    @classmethod
    def _weights(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (any(not math.isfinite(w) or w < 0 for w in v)
                              or not 0 < math.fsum(v) < float("inf")):
            raise ValueError("weights must be finite and non-negative with a positive, "
                             "finite sum")
        return v


class Item(BaseModel):
    """A validated, resolved unit of work: one content, its style(s), one output."""

    model_config = ConfigDict(extra="forbid")
    line: int
    id: str | None = None
    content: str
    styles: list[str]
    style_weights: list[float] | None = None
    alpha_c: float = 0.0
    mode: Mode
    max_size: int
    tile: Tile = "auto"
    content_mask: str | None = None
    style_mask: str | None = None
    output: str
    format: ItemFormat
    #: Encoder settings of an image output (None: the encoder's defaults).
    png_level: int | None = None
    jpeg_quality: int | None = None
    webp_quality: int | None = None
    #: A video item (content a video file or a folder/prefix of frames): planned into
    #: segments that run as separate tasks, then joined.
    video: bool = False

    @property
    def style_field(self) -> str | list[str]:
        """The report's ``style``: one URI, or the list for a mix."""
        return self.styles[0] if len(self.styles) == 1 else list(self.styles)

    @property
    def style_key(self) -> str:
        """Items with equal keys can reuse one style's statistics."""
        return "|".join([self.mode, str(self.max_size), *self.styles])


@dataclass(frozen=True)
class ItemError:
    """A line that cannot become an item; reported as failed with ``code``."""

    line: int
    code: str
    message: str
    id: str | None = None
    content: str | None = None
    style: str | list[str] | None = None
    output: str | None = None


def detect_format(uri: str, first_line: str | None = None) -> ManifestFormat:
    """By extension (.jsonl/.ndjson/.json or .csv), else by the first line's look."""
    ext = os.path.splitext(parse(uri).path)[1].lower()
    if ext in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if ext == ".csv":
        return "csv"
    return "jsonl" if (first_line or "").lstrip().startswith("{") else "csv"


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "line"
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        elif err.get("type") == "missing":
            parts.append(f"missing field {loc!r}")
        else:
            parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts)


def _split_list(text: str) -> list[str]:
    return [p.strip() for p in text.split("|") if p.strip()]


def csv_row_to_dict(header: list[str], row: list[str]) -> dict[str, Any]:
    """A CSV row as a line dict; lists use ``|`` (``a.jpg|b.jpg``, ``0.3|0.7``)."""
    if len(row) > len(header):
        raise InvalidItem(f"{len(row)} cells but the header has {len(header)} columns")
    out: dict[str, Any] = {}
    for name, cell in zip(header, row):
        cell = cell.strip()
        if cell == "":
            continue
        if name == "style" and "|" in cell:
            out[name] = _split_list(cell)
        elif name == "style_weights":
            try:
                out[name] = [float(x) for x in _split_list(cell.replace(";", "|"))]
            except ValueError:
                raise InvalidItem(f"style_weights: not numbers: {cell!r}") from None
        else:
            out[name] = cell
    return out


def parse_csv_header(text: str) -> list[str]:
    """Column names of a CSV header line (possibly unusable: see :func:`csv_header_problem`)."""
    try:
        return [h.strip() for h in next(csv.reader([text]), [])]
    except csv.Error:
        return []


def csv_header_problem(header: list[str]) -> str | None:
    """Why a CSV header cannot describe items, or None."""
    names = [h for h in header if h]
    if not names:
        return "the CSV header line names no columns"
    unknown = [h for h in names if h not in FIELDS]
    if unknown:
        return f"the CSV header has unknown column {unknown[0]!r}"
    if len(set(names)) != len(names):
        return "the CSV header names a column twice"
    if "content" not in names:
        return "the CSV header has no 'content' column"
    return None


def s3_batch_row(text: str) -> dict[str, Any]:
    """One row of an S3 Batch Operations CSV manifest as line fields: the listed object (one
    version of it, with a third cell) is the content.

    Keys are URL-encoded in these manifests, as S3 writes them: ``%XX`` escapes and ``+`` for
    a space (a literal plus is ``%2B``).
    """
    try:
        row = next(csv.reader([text]))
    except csv.Error as exc:
        raise InvalidItem(f"bad CSV: {exc}") from None
    if len(row) not in (2, 3):
        raise InvalidItem("an S3 Batch Operations row is bucket,key or bucket,key,versionId; "
                          f"this one has {len(row)} cells")
    bucket, key = row[0].strip(), unquote_plus(row[1])
    version = row[2].strip() if len(row) == 3 else ""
    if not bucket or not key:
        raise InvalidItem("an S3 Batch Operations row needs a bucket and a key")
    uri = f"s3://{bucket}/{key}"
    if key.endswith("/"):
        raise InvalidItem(f"{uri} is a folder placeholder, not an object")
    return {"content": versioned(uri, version or None)}


def parse_line(text: str, fmt: ManifestFormat, header: list[str] | None = None
               ) -> dict[str, Any]:
    """Raw fields of one non-blank line; InvalidItem for anything that is not a usable
    object (whatever the parser raised: deep nesting, huge numbers, bad CSV)."""
    if fmt == "s3-batch":
        return s3_batch_row(text)
    if fmt == "jsonl":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidItem(f"not valid JSON: {exc.msg} at column {exc.colno}") from None
        except RecursionError:
            raise InvalidItem("not valid JSON: nested too deeply") from None
        except ValueError as exc:  # e.g. an integer longer than Python converts
            raise InvalidItem(f"not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(obj, dict):
            raise InvalidItem(f"a line must be a JSON object, not {type(obj).__name__}")
        return obj
    problem = "no CSV header" if header is None else csv_header_problem(header)
    if problem or header is None:
        raise InvalidItem(problem or "no CSV header")
    try:
        row = next(csv.reader([text]))
    except csv.Error as exc:
        raise InvalidItem(f"bad CSV: {exc}") from None
    return csv_row_to_dict(header, row)


def _stem(uri: str) -> str:
    return os.path.splitext(parse(split_version(uri)[0].rstrip("/")).name)[0] or "image"


def is_video_content(ref: str) -> bool:
    """Whether a line's ``content`` names a video: a video file extension (MP4, M4V, MOV,
    MKV, AVI, WebM) or a folder/prefix of frames (a trailing ``/``). Decided from the name
    alone, so expansion never reads the object."""
    if ref.endswith("/"):
        return True
    path = parse(split_version(ref)[0]).path if "://" in ref else split_version(ref)[0]
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def _video_output(spec: LineSpec, content: str, styles: list[str], output_prefix: str
                  ) -> tuple[str, VideoFormat]:
    """Output URI and format of a video item: ``format`` (mp4, webm, frames) or the output's
    extension decides; the default is H.264 in MP4 next to the image outputs' names."""
    fmt = spec.format
    if fmt is not None and fmt not in VIDEO_FORMATS:
        raise InvalidItem(f"format {fmt!r} is for images; a video's output is "
                          + ", ".join(VIDEO_FORMATS))
    if spec.output:
        out = spec.output.rstrip("/")
        ext = posixpath.splitext(out)[1].lower()
        if spec.output.endswith("/") or not ext:
            chosen: VideoFormat = fmt or "frames"  # type: ignore[assignment]
            if chosen != "frames":
                out = f"{out}.{chosen}"
        else:
            vspec = output_spec(out)  # invalid_item for an extension no muxer takes
            if fmt is not None and fmt != vspec.format:
                raise InvalidItem(f"output {spec.output!r} does not match format {fmt!r}")
            if vspec.format == "frames":
                raise InvalidItem(f"output {spec.output!r} has an extension; frames go to a "
                                  "folder")
            chosen = vspec.format
        output = resolve(out, join(output_prefix, "x"))
    else:
        chosen = fmt or "mp4"  # type: ignore[assignment]
        name = f"{_stem(content)}__{'+'.join(_stem(s) for s in styles)}"
        output = join(output_prefix, name if chosen == "frames" else f"{name}.{chosen}")
    return output, chosen


def _key_folder(uri: str) -> str:
    """The folders of an S3 content's key ('' for other URIs)."""
    loc = parse(split_version(uri)[0])
    return posixpath.dirname(loc.path) if loc.scheme == "s3" else ""


def check_output(output: str, output_prefix: str) -> str:
    """The canonical form of ``output`` if it lies under ``output_prefix`` and outside
    capvst's own folder there; AccessDenied or InvalidItem otherwise.

    Both are compared after normalisation (``..``, ``.``, empty segments and
    percent-encoding of ``file://`` paths), never as raw strings.
    """
    loc, root = parse(output), parse(output_prefix)
    if loc.scheme == "s3":
        segments = loc.path.split("/")
        if any(seg in ("", ".", "..") for seg in segments):
            raise InvalidItem(f"output key {loc.path!r} has an empty, '.' or '..' segment")
    canonical, prefix = loc.uri, root.uri.rstrip("/")
    if loc.scheme != root.scheme or (loc.scheme == "s3" and loc.bucket != root.bucket) \
            or not canonical.startswith(prefix + "/"):
        raise AccessDenied(f"output {output} is outside the output prefix {output_prefix}")
    reserved = prefix + "/" + RESERVED
    if canonical == reserved or canonical.startswith(reserved + "/"):
        raise InvalidItem(f"outputs may not go under {RESERVED}/ (capvst's own folder)")
    return canonical


def build_item(raw: dict[str, Any], line: int, base: str, output_prefix: str,
               options: JobOptions) -> Item:
    """Validate one line's fields, resolve its URIs and name its output."""
    if "style" not in raw and options.styles:
        raw = {**raw, "style": list(options.styles)}
        if "style_weights" not in raw and options.style_weights is not None:
            raw["style_weights"] = list(options.style_weights)
    try:
        spec = LineSpec.model_validate(raw)
    except ValidationError as exc:
        raise InvalidItem(_pydantic_message(exc)) from None
    styles = [spec.style] if isinstance(spec.style, str) else list(spec.style)
    if spec.style_weights is not None and len(spec.style_weights) != len(styles):
        raise InvalidItem(f"{len(spec.style_weights)} style_weights for {len(styles)} styles")
    if (spec.content_mask is None) != (spec.style_mask is None):
        raise InvalidItem("content_mask and style_mask go together")
    if spec.content_mask is not None and len(styles) != 1:
        raise InvalidItem("masks work with exactly one style")
    content = resolve(spec.content, base)
    styles = [resolve(s, base) for s in styles]
    if is_video_content(spec.content):
        if spec.content.endswith("/") and not content.endswith("/"):
            content += "/"  # a prefix of frames stays a prefix (resolving normalizes it)
        output, vfmt = _video_output(spec, content, styles, output_prefix)
        output = check_output(output, output_prefix)
        for uri in (content, *styles):
            parse(uri)
        return Item(
            line=line, id=spec.id, content=content, styles=styles,
            style_weights=spec.style_weights, alpha_c=spec.alpha_c or 0.0,
            mode=spec.mode or options.mode, max_size=spec.max_size or options.max_size,
            content_mask=resolve(spec.content_mask, base) if spec.content_mask else None,
            style_mask=resolve(spec.style_mask, base) if spec.style_mask else None,
            output=output, format=vfmt, video=True)
    if spec.format in VIDEO_FORMATS:
        raise InvalidItem(f"format {spec.format!r} is for videos; {spec.content!r} is not "
                          "a video (MP4, MOV, MKV, AVI, WebM, or a folder of frames ending "
                          "in '/')")
    fmt: OutputFormat = spec.format or options.format  # type: ignore[assignment]
    if spec.output:
        ext = posixpath.splitext(spec.output)[1].lower().lstrip(".")
        ext = "jpg" if ext == "jpeg" else ext
        if ext and ext in OUTPUT_FORMATS:
            if spec.format and ext != spec.format:
                raise InvalidItem(f"output {spec.output!r} does not match format {spec.format!r}")
            fmt = ext  # type: ignore[assignment]
        elif ext:
            raise InvalidItem(f"unsupported output extension .{ext}; use "
                              + ", ".join("." + f for f in OUTPUT_FORMATS))
        else:
            spec_output = f"{spec.output}.{fmt}"
            spec = spec.model_copy(update={"output": spec_output})
        assert spec.output is not None
        output = resolve(spec.output, join(output_prefix, "x"))
    else:
        name = f"{_stem(content)}__{'+'.join(_stem(s) for s in styles)}.{fmt}"
        folder = _key_folder(content) if options.output_layout == "keys" else ""
        output = join(output_prefix, folder, name) if folder else join(output_prefix, name)
    output = check_output(output, output_prefix)
    for uri in (content, *styles):
        parse(uri)  # refuses NUL bytes and unknown schemes with invalid_item
    return Item(
        line=line, id=spec.id, content=content, styles=styles,
        style_weights=spec.style_weights, alpha_c=spec.alpha_c or 0.0,
        mode=spec.mode or options.mode,
        max_size=spec.max_size if spec.max_size is not None else options.max_size,
        tile=spec.tile if spec.tile is not None else options.tile,
        content_mask=resolve(spec.content_mask, base) if spec.content_mask else None,
        style_mask=resolve(spec.style_mask, base) if spec.style_mask else None,
        output=output, format=fmt,
        **{k: getattr(spec, k) if getattr(spec, k) is not None else getattr(options, k)
           for k in ENCODER_FIELDS},
    )


def item_error(raw: dict[str, Any] | None, line: int, exc: CapvstError) -> ItemError:
    """An :class:`ItemError` carrying whatever identifying fields the line had."""
    raw = raw or {}

    def text(key: str) -> str | None:
        v = raw.get(key)
        return v if isinstance(v, str) else None

    style = raw.get("style")
    if not (isinstance(style, str) or (isinstance(style, list)
                                       and all(isinstance(s, str) for s in style))):
        style = None
    return ItemError(line=line, code=exc.code, message=exc.message, id=text("id"),
                     content=text("content"), style=style, output=text("output"))


@dataclass(frozen=True)
class RawLine:
    """A physical line: its 1-based number, text (None if unusable) and the offset after it."""

    number: int
    text: str | None
    end: int
    problem: str | None = None


def iter_physical_lines(chunks: Iterator[bytes], start: int = 0, first_line: int = 1,
                        max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[RawLine]:
    """Split a byte stream into lines without ever buffering more than one line.

    Lines over ``max_line_bytes`` and lines that are not UTF-8 come back with ``text=None``
    and a ``problem``. A UTF-8 byte-order mark at offset 0 is dropped.
    """
    number, offset = first_line, start
    buf = bytearray()
    too_long = False
    for chunk in chunks:
        pos = 0
        while pos < len(chunk):
            nl = chunk.find(b"\n", pos)
            piece = chunk[pos:] if nl < 0 else chunk[pos:nl]
            if not too_long:
                buf += piece
                # room for a BOM and a '\r', which do not count; checked exactly in _finish
                if len(buf) > max_line_bytes + 4:
                    too_long, buf = True, bytearray()
            offset += len(piece)
            if nl < 0:
                break
            offset += 1
            pos = nl + 1
            yield _finish(number, buf, too_long, offset, max_line_bytes, start, first_line)
            number += 1
            buf, too_long = bytearray(), False
    if buf or too_long:
        yield _finish(number, buf, too_long, offset, max_line_bytes, start, first_line)


def _finish(number: int, buf: bytearray, too_long: bool, end: int, limit: int, start: int,
            first_line: int) -> RawLine:
    if too_long:
        return RawLine(number, None, end, f"line is longer than {limit:,} bytes")
    data = bytes(buf)
    if number == first_line and start == 0 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.endswith(b"\r"):
        data = data[:-1]
    if len(data) > limit:
        return RawLine(number, None, end, f"line is longer than {limit:,} bytes")
    try:
        return RawLine(number, data.decode("utf-8"), end)
    except UnicodeDecodeError:
        return RawLine(number, None, end, "line is not UTF-8 text")
