"""Video items in manifests: which contents are videos, their formats and default outputs,
and the report line's video fields."""

from __future__ import annotations

import pytest

from capvst.errors import InvalidItem
from capvst.manifest import JobOptions, build_item, is_video_content
from capvst.results import REPORT_KEYS, VIDEO_KEYS, ItemResult

BASE = "s3://b/in/m.jsonl"
OUT = "s3://b/out"


def item(**raw):
    return build_item({"style": "s.png", **raw}, 1, BASE, OUT, JobOptions())


@pytest.mark.parametrize("ref", ["a.mp4", "a.MOV", "x/a.mkv", "a.avi", "a.webm", "a.m4v",
                                 "frames/", "s3://b/shots/", "s3://b/v.mp4?versionId=3"])
def test_videos_are_known_by_extension_or_trailing_slash(ref):
    assert is_video_content(ref)


@pytest.mark.parametrize("ref", ["a.jpg", "a.png", "frames", "s3://b/a.webp", "a"])
def test_images_and_bare_names_are_not_videos(ref):
    assert not is_video_content(ref)


def test_video_item_defaults_to_h264_mp4_named_like_images():
    it = item(content="clips/a.mp4")
    assert (it.video, it.format, it.output) == (True, "mp4", "s3://b/out/a__s.mp4")
    assert it.content == "s3://b/in/clips/a.mp4"


def test_video_formats_choose_the_output():
    assert item(content="a.mov", format="webm").output == "s3://b/out/a__s.webm"
    frames = item(content="a.mov", format="frames")
    assert (frames.format, frames.output) == ("frames", "s3://b/out/a__s")
    assert item(content="a.mp4", output="v/x.mkv").format == "mp4"
    assert item(content="a.mp4", output="v/x.webm").format == "webm"
    assert item(content="a.mp4", output="v/shots/").format == "frames"
    assert item(content="a.mp4", output="v/x", format="webm").output == "s3://b/out/v/x.webm"


def test_frame_prefix_content_stays_a_prefix():
    it = item(content="shots/")
    assert (it.content, it.output) == ("s3://b/in/shots/", "s3://b/out/shots__s.mp4")


@pytest.mark.parametrize("raw", [
    {"content": "a.mp4", "format": "png"},
    {"content": "a.mp4", "output": "x.png"},
    {"content": "a.mp4", "output": "x.webm", "format": "mp4"},
    {"content": "a.jpg", "format": "mp4"},
    {"content": "a.mp4", "output": "../../elsewhere.mp4"},
])
def test_bad_video_lines_are_item_errors(raw):
    with pytest.raises(Exception) as exc:
        item(**raw)
    assert getattr(exc.value, "code", None) in ("invalid_item", "access_denied")


def test_image_lines_are_unchanged():
    it = item(content="a.jpg")
    assert (it.video, it.format, it.output) == (False, "png", "s3://b/out/a__s.png")
    with pytest.raises(InvalidItem):
        item(content="a.jpg", format="frames")


def test_report_line_adds_video_keys_only_for_videos():
    base = dict(line=1, content="a.mp4", status="succeeded")
    assert tuple(ItemResult(**base).report_line()) == REPORT_KEYS
    video = ItemResult(**base, frames=36, segments=3, warping_error=0.01,
                       video_seconds={"model": 1.0})
    line = video.report_line()
    assert tuple(line) == REPORT_KEYS + VIDEO_KEYS
    assert (line["frames"], line["segments"], line["warping_error"]) == (36, 3, 0.01)
    assert ItemResult.from_json(video.to_json()).report_line() == line
