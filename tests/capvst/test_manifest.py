"""The manifest parser: physical lines, formats, line fields and item building (DESIGN.md §5)."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from capvst.errors import AccessDenied, CapvstError, InvalidItem
from capvst.manifest import (
    MAX_LINE_BYTES,
    Item,
    JobOptions,
    RawLine,
    build_item,
    csv_row_to_dict,
    detect_format,
    item_error,
    iter_physical_lines,
    parse_csv_header,
    parse_line,
)

BOM = b"\xef\xbb\xbf"


def lines_of(data: bytes, *cuts: int, **kw) -> list[RawLine]:
    """Feed ``data`` split at ``cuts`` (byte offsets) and collect every line."""
    bounds = [0, *sorted(cuts), len(data)]
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    return list(iter_physical_lines(iter(chunks), **kw))


def texts(lines: list[RawLine]) -> list[str | None]:
    return [ln.text for ln in lines]


def ambiguous(data: bytes, limit: int) -> bool:
    """A line whose length is over ``limit`` only because of its BOM or its CR (see
    test_line_limit_does_not_depend_on_line_endings): left out of the model comparison."""
    for n, raw in enumerate(data.split(b"\n"), 1):
        extra = (3 if n == 1 and raw.startswith(BOM) else 0) + raw.endswith(b"\r")
        if limit < len(raw) <= limit + extra:
            return True
    return False


def oracle(data: bytes, limit: int) -> list[RawLine]:
    """An independent, whole-buffer model of what iter_physical_lines must return."""
    out = []
    pieces = data.split(b"\n")
    if pieces and pieces[-1] == b"":
        pieces.pop()
    offset = 0
    for n, raw in enumerate(pieces, 1):
        offset += len(raw) + 1
        end = min(offset, len(data))
        if len(raw) > limit:
            out.append(RawLine(n, None, end, f"line is longer than {limit:,} bytes"))
            continue
        body = raw[3:] if n == 1 and raw.startswith(BOM) else raw
        body = body[:-1] if body.endswith(b"\r") else body
        try:
            out.append(RawLine(n, body.decode("utf-8"), end))
        except UnicodeDecodeError:
            out.append(RawLine(n, None, end, "line is not UTF-8 text"))
    return out


# --- iter_physical_lines -----------------------------------------------------------------------

def test_lines_are_numbered_from_one_with_end_offsets():
    data = b'{"a": 1}\n{"b": 2}\n'
    got = lines_of(data)
    assert got == [RawLine(1, '{"a": 1}', 9), RawLine(2, '{"b": 2}', 18)]
    assert all(ln.problem is None for ln in got)


def test_last_line_without_newline_is_returned():
    got = lines_of(b"one\ntwo")
    assert texts(got) == ["one", "two"]
    assert got[-1].end == 7


def test_empty_stream_and_empty_chunks_give_no_lines():
    assert list(iter_physical_lines(iter([]))) == []
    assert list(iter_physical_lines(iter([b"", b"", b""]))) == []


def test_blank_lines_keep_their_physical_numbers():
    got = lines_of(b"a\n\n\nb\n\n")
    assert [(ln.number, ln.text) for ln in got] == [(1, "a"), (2, ""), (3, ""), (4, "b"),
                                                     (5, "")]


def test_crlf_line_endings_are_stripped():
    got = lines_of(b"a,b\r\nc,d\r\n\r\ne\r\n")
    assert texts(got) == ["a,b", "c,d", "", "e"]
    assert [ln.end for ln in got] == [5, 10, 12, 15]


def test_lone_carriage_return_inside_a_line_is_kept():
    assert texts(lines_of(b"a\rb\n")) == ["a\rb"]


def test_bom_dropped_only_at_offset_zero():
    got = lines_of(BOM + b"content,style\n" + BOM + b"x,y\n")
    assert got[0].text == "content,style"
    assert got[0].end == 3 + 14  # the BOM still counts in the byte offsets
    assert got[1].text == "\ufeffx,y"


def test_bom_kept_when_resuming_from_a_later_offset():
    # offset 0 of the file is the only place a BOM means "byte-order mark"
    got = list(iter_physical_lines(iter([BOM + b"x\n"]), start=10, first_line=4))
    assert got == [RawLine(4, "\ufeffx", 15)]


def test_bom_split_across_chunks_is_dropped():
    data = BOM + b'{"a": 1}\n'
    for cut in (1, 2, 3):
        assert texts(lines_of(data, cut)) == ['{"a": 1}']


def test_non_utf8_line_fails_alone():
    got = lines_of(b"ok\n\xff\xfe bad\nfine\n")
    assert texts(got) == ["ok", None, "fine"]
    assert got[1].problem == "line is not UTF-8 text"
    assert got[1].number == 2 and got[1].end == 10


def test_line_limit_is_inclusive():
    got = lines_of(b"12345678\n123456789\nabc\n", max_line_bytes=8)
    assert texts(got) == ["12345678", None, "abc"]
    assert got[1].problem == "line is longer than 8 bytes"
    assert [ln.end for ln in got] == [9, 19, 23]


def test_overlong_last_line_without_newline():
    got = lines_of(b"ok\n" + b"x" * 20, max_line_bytes=8)
    assert [(ln.number, ln.text, ln.end) for ln in got] == [(1, "ok", 3), (2, None, 23)]
    assert "longer than 8 bytes" in (got[1].problem or "")


def test_line_limit_does_not_depend_on_line_endings():
    lf = lines_of(b"12345678\n", max_line_bytes=8)
    crlf = lines_of(b"12345678\r\n", max_line_bytes=8)
    assert texts(lf) == texts(crlf) == ["12345678"]


def test_default_limit_is_64_kib():
    assert MAX_LINE_BYTES == 64 * 1024
    ok = b"x" * MAX_LINE_BYTES
    got = lines_of(ok + b"\n" + ok + b"y\n")
    assert got[0].text == ok.decode()
    assert got[1].text is None and got[1].problem == "line is longer than 65,536 bytes"


def test_five_megabyte_line_is_streamed_not_buffered():
    chunk = 64 * 1024
    n_chunks = 80  # 5 MiB of one line

    first = b'{"content": "a.jpg", "style": "b.jpg"}\n'

    def chunks() -> Iterator[bytes]:
        yield first
        for _ in range(n_chunks):
            yield b"x" * chunk
        yield b'\n{"content": "c.jpg", "style": "d.jpg"}\n'

    tracemalloc.start()
    try:
        got = list(iter_physical_lines(chunks()))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(ln.number, ln.text is None) for ln in got] == [(1, False), (2, True), (3, False)]
    assert got[1].problem == "line is longer than 65,536 bytes"
    assert got[1].end == len(first) + n_chunks * chunk + 1
    assert json.loads(got[2].text or "") == {"content": "c.jpg", "style": "d.jpg"}
    assert peak < 1024 * 1024, f"peak {peak:,} bytes: the long line was buffered"


def test_resuming_from_every_line_end_gives_the_same_lines():
    data = (BOM + b'{"a": 1}\r\n\n{"b": "\xc3\xa9"}\n\xff\n' + b"z" * 30 + b"\nlast")
    full = lines_of(data, max_line_bytes=16)
    assert len(full) == 6
    for k, prev in enumerate(full):
        rest = list(iter_physical_lines(iter([data[prev.end:]]), start=prev.end,
                                        first_line=prev.number + 1, max_line_bytes=16))
        assert rest == full[k + 1:]


def test_multibyte_character_and_crlf_split_across_chunks():
    data = "é€😀\r\nnext\r\n".encode()
    whole = lines_of(data)
    assert texts(whole) == ["é€😀", "next"]
    for cut in range(1, len(data)):
        assert lines_of(data, cut) == whole, f"cut at {cut}"


_line_bytes = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"),
            max_size=12).map(lambda s: s.encode()),
    st.binary(max_size=12).filter(lambda b: b"\n" not in b),
)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.tuples(_line_bytes, st.sampled_from([b"\n", b"\r\n"])), max_size=8),
       bom=st.booleans(), tail=_line_bytes, limit=st.integers(4, 40), data=st.data())
def test_any_chunking_matches_the_whole_buffer_model(lines, bom, tail, limit, data):
    raw = (BOM if bom else b"") + b"".join(a + b for a, b in lines) + tail
    assume(not ambiguous(raw, limit))
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=10))
    got = lines_of(raw, *cuts, max_line_bytes=limit)
    assert got == oracle(raw, limit)
    # and resuming after any line reproduces the rest
    if got:
        k = data.draw(st.integers(0, len(got) - 1))
        rest = list(iter_physical_lines(iter([raw[got[k].end:]]), start=got[k].end,
                                        first_line=got[k].number + 1, max_line_bytes=limit))
        assert rest == got[k + 1:]


# --- detect_format -----------------------------------------------------------------------------

@pytest.mark.parametrize("uri,fmt", [
    ("s3://b/m.jsonl", "jsonl"), ("s3://b/m.NDJSON", "jsonl"), ("/tmp/m.json", "jsonl"),
    ("file:///tmp/m.csv", "csv"), ("s3://b/dir.jsonl/m.CSV", "csv"),
])
def test_detect_format_by_extension(uri, fmt):
    assert detect_format(uri, '{"content": "x"}' if fmt == "csv" else "content,style") == fmt


@pytest.mark.parametrize("first,fmt", [
    ('{"content": "a.jpg"}', "jsonl"), ('   {"content": "a.jpg"}', "jsonl"),
    ("content,style", "csv"), ("", "csv"), (None, "csv"),
])
def test_detect_format_by_first_line(first, fmt):
    assert detect_format("s3://b/manifest.txt", first) == fmt
    assert detect_format("s3://b/manifest", first) == fmt


# --- parse_line --------------------------------------------------------------------------------

def test_parse_jsonl_line():
    assert parse_line('{"content": "a.jpg", "style": ["x.jpg", "y.jpg"]}', "jsonl") == {
        "content": "a.jpg", "style": ["x.jpg", "y.jpg"]}


@pytest.mark.parametrize("text,message", [
    ('{"content": "a.jpg"', r"not valid JSON: .* at column \d+"),
    ("not json", r"not valid JSON: Expecting value at column 1"),
    ('["a.jpg", "b.jpg"]', r"a line must be a JSON object, not list"),
    ('"a.jpg"', r"a line must be a JSON object, not str"),
    ("42", r"a line must be a JSON object, not int"),
    ("null", r"a line must be a JSON object, not NoneType"),
])
def test_parse_jsonl_line_errors(text, message):
    with pytest.raises(InvalidItem, match=message) as info:
        parse_line(text, "jsonl")
    assert info.value.code == "invalid_item"


def test_parse_csv_header_strips_names():
    assert parse_csv_header(" content , style,style_weights ") == [
        "content", "style", "style_weights"]
    assert parse_csv_header('content,"style",output') == ["content", "style", "output"]


def test_parse_csv_line_lists_and_empty_cells():
    header = parse_csv_header("content,style,style_weights,alpha_c,output,id")
    got = parse_line('a.jpg, x.jpg | y.jpg ,0.3|0.7,,"out, with comma.png",', "csv", header)
    assert got == {"content": "a.jpg", "style": ["x.jpg", "y.jpg"],
                   "style_weights": [0.3, 0.7], "output": "out, with comma.png"}


def test_csv_single_style_stays_a_string_and_short_rows_are_fine():
    header = ["content", "style", "alpha_c", "mode"]
    assert csv_row_to_dict(header, ["a.jpg", "x.jpg"]) == {"content": "a.jpg", "style": "x.jpg"}
    assert csv_row_to_dict(header, ["a.jpg", "x.jpg", "0.2", " artistic "]) == {
        "content": "a.jpg", "style": "x.jpg", "alpha_c": "0.2", "mode": "artistic"}


def test_csv_weights_accept_semicolons_and_drop_empty_parts():
    header = ["content", "style", "style_weights"]
    assert csv_row_to_dict(header, ["a", "x|y|", "1;2|"])["style_weights"] == [1.0, 2.0]
    assert csv_row_to_dict(header, ["a", "x|y|", "1;2|"])["style"] == ["x", "y"]


def test_csv_too_many_cells():
    with pytest.raises(InvalidItem, match="4 cells but the header has 2 columns"):
        csv_row_to_dict(["content", "style"], ["a", "b", "c", "d"])
    with pytest.raises(InvalidItem, match="3 cells but the header has 2 columns"):
        parse_line("a.jpg,b.jpg,extra", "csv", ["content", "style"])


def test_csv_weights_not_numbers():
    with pytest.raises(InvalidItem, match=r"style_weights: not numbers: '0.3\|heavy'"):
        csv_row_to_dict(["content", "style", "style_weights"], ["a", "x|y", "0.3|heavy"])


def test_csv_row_builds_an_item_with_numbers_from_text():
    header = parse_csv_header("content,style,style_weights,alpha_c,max_size,mode,format")
    raw = parse_line("a.jpg,x.jpg|y.jpg,1|3,0.25,512,artistic,webp", "csv", header)
    item = build_item(raw, 2, "s3://bk/m/manifest.csv", "s3://out/run", JobOptions())
    assert item.styles == ["s3://bk/m/x.jpg", "s3://bk/m/y.jpg"]
    assert item.style_weights == [1.0, 3.0]
    assert (item.alpha_c, item.max_size, item.mode, item.format) == (0.25, 512, "artistic",
                                                                      "webp")
    assert item.output == "s3://out/run/a__x+y.webp"


# --- build_item --------------------------------------------------------------------------------

OPTS = JobOptions()
S3_BASE = "s3://bk/manifests/job1.jsonl"
S3_OUT = "s3://out/results"


def build(raw: dict, base: str = S3_BASE, out: str = S3_OUT, options: JobOptions = OPTS,
          line: int = 7):
    return build_item(raw, line, base, out, options)


def test_relative_uris_resolve_against_an_s3_manifest():
    item = build({"content": "photos/a.jpg", "style": "../styles/x.png",
                  "content_mask": "masks/a.png", "style_mask": "/abs/ignored.png"})
    assert item.line == 7
    assert item.content == "s3://bk/manifests/photos/a.jpg"
    assert item.styles == ["s3://bk/styles/x.png"]
    assert item.content_mask == "s3://bk/manifests/masks/a.png"
    assert item.style_mask == "/abs/ignored.png"  # absolute references are kept as written


def test_absolute_uris_are_kept():
    item = build({"content": "s3://pics/a.jpg", "style": ["s3://pics/x.jpg", "file:///s/y.jpg"]})
    assert item.content == "s3://pics/a.jpg"
    assert item.styles == ["s3://pics/x.jpg", "file:///s/y.jpg"]


def test_relative_uris_resolve_against_a_local_manifest(tmp_path):
    base = (tmp_path / "m" / "manifest.jsonl").as_uri()
    item = build({"content": "a b.jpg", "style": "../s/x.jpg"}, base=base,
                 out=str(tmp_path / "out"))
    assert item.content == (tmp_path / "m" / "a b.jpg").as_uri()
    assert item.styles == [(tmp_path / "s" / "x.jpg").as_uri()]
    assert item.output == (tmp_path / "out" / "a b__x.png").as_uri()


def test_relative_uri_escaping_the_bucket_is_refused():
    with pytest.raises(AccessDenied, match="points outside the bucket"):
        build({"content": "../../etc/a.jpg", "style": "x.jpg"})


def test_job_defaults_apply_and_a_line_overrides_them():
    options = JobOptions(mode="artistic", max_size=512, format="jpg")
    item = build({"content": "a.jpg", "style": "x.jpg"}, options=options)
    assert (item.mode, item.max_size, item.format, item.alpha_c) == ("artistic", 512, "jpg", 0.0)
    assert item.output == "s3://out/results/a__x.jpg"
    item = build({"content": "a.jpg", "style": "x.jpg", "mode": "photorealistic",
                  "max_size": 2048, "format": "webp", "alpha_c": 0.5}, options=options)
    assert (item.mode, item.max_size, item.format, item.alpha_c) == (
        "photorealistic", 2048, "webp", 0.5)
    assert item.output == "s3://out/results/a__x.webp"


def test_encoder_settings_from_the_job_and_the_line():
    item = build({"content": "a.jpg", "style": "x.jpg"})
    assert (item.png_level, item.jpeg_quality, item.webp_quality) == (None, None, None)
    options = JobOptions(png_level=9, jpeg_quality=80)
    item = build({"content": "a.jpg", "style": "x.jpg", "jpeg_quality": 60,
                  "webp_quality": 70}, options=options)
    assert (item.png_level, item.jpeg_quality, item.webp_quality) == (9, 60, 70)
    header = parse_csv_header("content,style,png_level")
    raw = parse_line("a.jpg,x.jpg,3", "csv", header)
    assert build_item(raw, 2, S3_BASE, S3_OUT, OPTS).png_level == 3


@pytest.mark.parametrize("raw, message", [
    ({"png_level": 10}, r"png_level: Input should be less than or equal to 9"),
    ({"png_level": -1}, r"png_level: Input should be greater than or equal to 0"),
    ({"png_level": True}, r"png_level: Value error, must be a number, not true/false"),
    ({"png_level": 2.5}, r"png_level: Input should be a valid integer"),
    ({"jpeg_quality": 0}, r"jpeg_quality: Input should be greater than or equal to 1"),
    ({"webp_quality": 101}, r"webp_quality: Input should be less than or equal to 100"),
])
def test_bad_encoder_settings_fail_the_line(raw, message):
    with pytest.raises(InvalidItem, match=message):
        build({"content": "a.jpg", "style": "x.jpg", **raw})
    with pytest.raises(ValidationError):
        JobOptions(**raw)


def test_builtin_defaults():
    item = build({"content": "a.jpg", "style": "x.jpg"})
    assert (item.mode, item.max_size, item.format) == ("photorealistic", 1280, "png")
    assert item.style_weights is None and item.id is None
    assert item.content_mask is None and item.style_mask is None


def test_default_output_joins_style_stems():
    item = build({"content": "dir/photo.v1.jpeg", "style": ["s/x.jpg", "t/y.png", "z"],
                  "style_weights": [1, 2, 3]})
    assert item.output == "s3://out/results/photo.v1__x+y+z.png"
    assert item.style_field == item.styles
    single = build({"content": "a.jpg", "style": "x.jpg"})
    assert single.style_field == "s3://bk/manifests/x.jpg"


def test_default_output_under_a_bucket_root_and_trailing_slash():
    assert build({"content": "a.jpg", "style": "x.jpg"}, out="s3://out").output == \
        "s3://out/a__x.png"
    assert build({"content": "a.jpg", "style": "x.jpg"}, out="s3://out/r/").output == \
        "s3://out/r/a__x.png"


@pytest.mark.parametrize("output,fmt,expected", [
    ("special/c.webp", None, ("s3://out/results/special/c.webp", "webp")),
    ("c.JPEG", None, ("s3://out/results/c.JPEG", "jpg")),
    ("c.jpeg", "jpg", ("s3://out/results/c.jpeg", "jpg")),
    ("c", None, ("s3://out/results/c.png", "png")),
    ("c", "webp", ("s3://out/results/c.webp", "webp")),
    ("v1.2/c", "jpg", ("s3://out/results/v1.2/c.jpg", "jpg")),
    ("./a/../b.png", None, ("s3://out/results/b.png", "png")),
    ("s3://out/results/abs/x.png", None, ("s3://out/results/abs/x.png", "png")),
])
def test_explicit_output_is_relative_to_the_prefix(output, fmt, expected):
    raw = {"content": "a.jpg", "style": "x.jpg", "output": output}
    if fmt:
        raw["format"] = fmt
    item = build(raw)
    assert (item.output, item.format) == expected


@pytest.mark.parametrize("output", ["s3://elsewhere/x.png", "../x.png", "s3://out/resultsX/a.png",
                                    "s3://out/results/_capvst/j/x.png"])
def test_explicit_output_cannot_leave_the_prefix(output):
    with pytest.raises(CapvstError, match="outside the output prefix|may not go under"):
        build({"content": "a.jpg", "style": "x.jpg", "output": output})


def test_output_extension_wins_over_the_job_default_format():
    item = build({"content": "a.jpg", "style": "x.jpg", "output": "c.webp"},
                 options=JobOptions(format="jpg"))
    assert item.format == "webp"


def test_local_explicit_output(tmp_path):
    item = build({"content": "a.jpg", "style": "x.jpg", "output": "sub/c"},
                 base=str(tmp_path / "manifest.jsonl"), out=str(tmp_path / "out"))
    assert item.output == (tmp_path / "out" / "sub" / "c.png").as_uri()


@pytest.mark.parametrize("raw,message", [
    ({"output": "c.png", "format": "jpg"}, r"output 'c.png' does not match format 'jpg'"),
    ({"output": "c.jpeg", "format": "webp"}, r"output 'c.jpeg' does not match format 'webp'"),
    ({"output": "c.tiff"}, r"unsupported output extension .tiff; use .png, .jpg, .webp"),
])
def test_output_extension_conflicts(raw, message):
    with pytest.raises(InvalidItem, match=message):
        build({"content": "a.jpg", "style": "x.jpg"} | raw)


@pytest.mark.parametrize("output", [
    "_capvst/x.png", "_capvst/job/report.png", "sub/../_capvst/x.png", "./_capvst/a/b.webp",
    "s3://out/results/_capvst/x.png", "_capvst",
])
def test_outputs_under_the_reserved_folder_are_refused(output):
    raw = {"content": "a.jpg", "style": "x.jpg", "output": output}
    if output == "_capvst":
        # with no extension the name becomes "_capvst.png", a plain file next to the folder
        assert build(raw).output == "s3://out/results/_capvst.png"
        return
    with pytest.raises(InvalidItem, match=r"outputs may not go under _capvst/"):
        build(raw)


def test_reserved_folder_refused_for_local_outputs(tmp_path):
    with pytest.raises(InvalidItem, match=r"outputs may not go under _capvst/"):
        build({"content": "a.jpg", "style": "x.jpg", "output": "_capvst/r.png"},
              base=str(tmp_path / "m.jsonl"), out=str(tmp_path / "out"))


def test_default_output_named_like_the_reserved_folder_is_not_inside_it():
    item = build({"content": "_capvst/a.jpg", "style": "x.jpg"})
    assert item.output == "s3://out/results/a__x.png"


@pytest.mark.parametrize("raw,message", [
    ({"style": "x.jpg"}, r"missing field 'content'"),
    ({"content": "a.jpg"}, r"missing field 'style'"),
    ({"content": "   ", "style": "x.jpg"}, r"content: String should have at least 1 character"),
    ({"content": "a.jpg", "style": "x.jpg", "colour": "red"}, r"unknown field 'colour'"),
    ({"content": "a.jpg", "style": "x.jpg", "Output": "o.png"}, r"unknown field 'Output'"),
    ({"content": ["a.jpg"], "style": "x.jpg"}, r"content: Input should be a valid string"),
    ({"content": 5, "style": "x.jpg"}, r"content: Input should be a valid string"),
    ({"content": "a.jpg", "style": []}, r"style must be a URI or a non-empty list of URIs"),
    ({"content": "a.jpg", "style": ["x.jpg", " "]}, r"style must be a URI or a non-empty list"),
    ({"content": "a.jpg", "style": 3}, r"style"),
    ({"content": "a.jpg", "style": "x.jpg", "alpha_c": "lots"},
     r"alpha_c: Input should be a valid number"),
    ({"content": "a.jpg", "style": "x.jpg", "alpha_c": 1.5},
     r"alpha_c: Input should be less than or equal to 1"),
    ({"content": "a.jpg", "style": "x.jpg", "alpha_c": -0.1},
     r"alpha_c: Input should be greater than or equal to 0"),
    ({"content": "a.jpg", "style": "x.jpg", "max_size": 4},
     r"max_size: Value error, must be 0 \(full resolution\) or between 8 and 8192"),
    ({"content": "a.jpg", "style": "x.jpg", "max_size": 8193},
     r"max_size: Value error, must be 0 \(full resolution\) or between 8 and 8192"),
    ({"content": "a.jpg", "style": "x.jpg", "max_size": 600.5},
     r"max_size: Input should be a valid integer"),
    ({"content": "a.jpg", "style": "x.jpg", "mode": "Artistic"}, r"mode: Input should be"),
    ({"content": "a.jpg", "style": "x.jpg", "format": "gif"}, r"format: Input should be"),
    ({"content": "a.jpg", "style": "x.jpg", "id": 42}, r"id: Input should be a valid string"),
    ({"content": "a.jpg", "style": "x.jpg", "id": "i" * 513}, r"id: String should have at most"),
    ({"content": "a.jpg", "style": ["x", "y"], "style_weights": [1.0]},
     r"1 style_weights for 2 styles"),
    ({"content": "a.jpg", "style": "x", "style_weights": [0.5, 0.5]},
     r"2 style_weights for 1 styles"),
    ({"content": "a.jpg", "style": ["x", "y"], "style_weights": [-1, 2]},
     r"weights must be finite and non-negative with a positive, finite sum"),
    ({"content": "a.jpg", "style": ["x", "y"], "style_weights": [0, 0]},
     r"weights must be finite and non-negative with a positive, finite sum"),
    ({"content": "a.jpg", "style": ["x", "y"], "style_weights": [float("nan"), 1]},
     r"weights must be finite and non-negative with a positive, finite sum"),
    ({"content": "a.jpg", "style": ["x", "y"], "style_weights": [float("inf"), 1]},
     r"weights must be finite and non-negative with a positive, finite sum"),
    ({"content": "a.jpg", "style": ["x", "y"], "style_weights": "0.5,0.5"},
     r"style_weights: Input should be a valid list"),
    ({"content": "a.jpg", "style": "x", "content_mask": "m.png"},
     r"content_mask and style_mask go together"),
    ({"content": "a.jpg", "style": "x", "style_mask": "m.png"},
     r"content_mask and style_mask go together"),
    ({"content": "a.jpg", "style": ["x", "y"], "content_mask": "c.png", "style_mask": "s.png"},
     r"masks work with exactly one style"),
])
def test_invalid_lines(raw, message):
    with pytest.raises(InvalidItem, match=message) as info:
        build(raw)
    assert info.value.code == "invalid_item"
    assert "Traceback" not in info.value.message and "pydantic" not in info.value.message


def test_several_problems_are_reported_together():
    with pytest.raises(InvalidItem) as info:
        build({"content": "a.jpg", "style": "x", "alpha_c": 3, "bogus": 1})
    assert "alpha_c: Input should be less than or equal to 1" in info.value.message
    assert "unknown field 'bogus'" in info.value.message


def test_masks_with_one_style_in_a_list_are_fine():
    item = build({"content": "a.jpg", "style": ["x.jpg"], "content_mask": "mc.png",
                  "style_mask": "ms.png", "id": "c-42"})
    assert item.content_mask == "s3://bk/manifests/mc.png"
    assert item.style_mask == "s3://bk/manifests/ms.png"
    assert item.id == "c-42"


def test_strings_are_stripped():
    item = build({"content": "  a.jpg ", "style": [" x.jpg "], "id": " c-1 "})
    assert item.content == "s3://bk/manifests/a.jpg"
    assert item.styles == ["s3://bk/manifests/x.jpg"]
    assert item.id == "c-1"


def test_style_key_groups_items_by_mode_size_and_styles():
    a = build({"content": "a.jpg", "style": "x.jpg"})
    b = build({"content": "b.jpg", "style": "x.jpg"})
    c = build({"content": "a.jpg", "style": "x.jpg", "max_size": 512})
    assert a.style_key == b.style_key != c.style_key


def test_boolean_alpha_c_is_refused():
    with pytest.raises(InvalidItem, match="alpha_c"):
        build({"content": "a.jpg", "style": "x.jpg", "alpha_c": True})


# --- item_error --------------------------------------------------------------------------------

def test_item_error_keeps_identifying_fields():
    raw = {"content": "a.jpg", "style": ["x", "y"], "id": "c-1", "output": "o.png",
           "alpha_c": 9}
    err = item_error(raw, 12, InvalidItem("alpha_c: too big"))
    assert (err.line, err.code, err.message) == (12, "invalid_item", "alpha_c: too big")
    assert (err.id, err.content, err.style, err.output) == ("c-1", "a.jpg", ["x", "y"], "o.png")


def test_item_error_drops_fields_of_the_wrong_type():
    raw = {"content": ["a.jpg"], "style": ["x", 3], "id": 42, "output": None}
    err = item_error(raw, 3, InvalidItem("bad"))
    assert (err.id, err.content, err.style, err.output) == (None, None, None, None)
    assert item_error({"style": "x.jpg"}, 3, InvalidItem("bad")).style == "x.jpg"


def test_item_error_for_a_line_that_never_parsed():
    err = item_error(None, 5, InvalidItem("not valid JSON"))
    assert err.line == 5 and err.code == "invalid_item" and err.message == "not valid JSON"
    assert (err.id, err.content, err.style, err.output) == (None, None, None, None)


def test_item_error_uses_the_code_of_the_error():
    err = item_error({"content": "a.jpg"}, 2, AccessDenied("outside"))
    assert err.code == "access_denied" and err.content == "a.jpg"


# --- full resolution and tiling ------------------------------------------------------------------
def test_max_size_zero_is_full_resolution_and_not_the_default():
    assert build({"content": "a.jpg", "style": "x.jpg", "max_size": 0}).max_size == 0
    assert build({"content": "a.jpg", "style": "x.jpg"}, options=JobOptions(max_size=0)
                 ).max_size == 0
    assert build({"content": "a.jpg", "style": "x.jpg", "max_size": 512},
                 options=JobOptions(max_size=0)).max_size == 512
    for bad in (4, -1, 9000, True):
        with pytest.raises(InvalidItem, match="max_size"):
            build({"content": "a.jpg", "style": "x.jpg", "max_size": bad})


@pytest.mark.parametrize("value,want", [("auto", "auto"), ("OFF", "off"), (1024, 1024),
                                        ("2048", 2048), (512.0, 512)])
def test_tile_field(value, want):
    assert build({"content": "a.jpg", "style": "x.jpg", "tile": value}).tile == want


@pytest.mark.parametrize("value", ["big", 32, 0, True, 100.5, [512]])
def test_tile_field_refuses_bad_values(value):
    with pytest.raises(InvalidItem, match="tile"):
        build({"content": "a.jpg", "style": "x.jpg", "tile": value})


def test_tile_defaults_to_the_job_option_and_reads_from_csv():
    assert build({"content": "a.jpg", "style": "x.jpg"}).tile == "auto"
    assert build({"content": "a.jpg", "style": "x.jpg"}, options=JobOptions(tile=1024)
                 ).tile == 1024
    header = parse_csv_header("content,style,max_size,tile")
    item = build_item(parse_line("a.jpg,x.jpg,0,768", "csv", header), 2,
                      "s3://bk/m/manifest.csv", "s3://out/run", JobOptions())
    assert (item.max_size, item.tile) == (0, 768)
    assert Item.model_validate_json(item.model_dump_json()).tile == 768
