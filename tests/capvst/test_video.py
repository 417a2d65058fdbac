"""The video library without the model: probe, plan, exact segment decoding, output choices,
the warping error, hostile files, limits, and S3 sources."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from capvst.errors import BadVideo, InvalidItem, NotFound, TooLarge
from capvst.settings import Settings
from capvst.storage import Storage
from capvst.video import (
    RangeReader,
    VideoInfo,
    VideoLimits,
    audio_action,
    available_encoders,
    frame_name,
    natural_key,
    open_video,
    output_spec,
    plan_segments,
    sniff,
    warping_error,
)
from tests.video_data import decode_frames, make_frames, make_video

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """One 3 s, 12 fps, 64x48 video per container, keyframes every second."""
    d = tmp_path_factory.mktemp("videos")
    return {
        "mp4": make_video(d / "clip.mp4"),
        "mov": make_video(d / "clip.mov", fmt="mov"),
        "mkv": make_video(d / "clip.mkv", audio="libopus"),
        "webm": make_video(d / "clip.webm", codec="libvpx-vp9", audio="libopus"),
        "avi": make_video(d / "clip.avi", codec="mpeg4", audio="pcm_s16le"),
        "silent": make_video(d / "silent.mp4", audio=None),
    }


@pytest.fixture
def store():
    return Storage(Settings(), confine_local=False)


def _info(store, uri, **kw) -> VideoInfo:
    with open_video(store, uri, **kw) as src:
        return src.info


# --- probe and plan ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind,audio", [("mp4", "aac"), ("mov", "aac"), ("mkv", "opus"),
                                        ("webm", "opus"), ("avi", "pcm_s16le"),
                                        ("silent", None)])
def test_probe_reads_frames_timing_keyframes_and_audio(videos, store, kind, audio):
    info = _info(store, videos[kind])
    assert (info.frames, info.width, info.height) == (36, 64, 48)
    assert info.fps == 12
    assert info.duration == pytest.approx(3.0, abs=1e-3)
    assert info.keyframes == (0, 12, 24)
    assert info.has_audio is (audio is not None) and info.audio_codec == audio
    assert len(info.pts) == 36 and list(info.pts) == sorted(set(info.pts))
    again = VideoInfo.from_dict(info.as_dict(with_pts=True))
    assert again == info
    assert "pts" not in info.as_dict()


def test_plan_covers_every_frame_once_cut_at_keyframes(videos, store):
    info = _info(store, videos["mp4"])
    segs = plan_segments(info, 1.0)
    assert [(s.start, s.end) for s in segs] == [(0, 12), (12, 24), (24, 36)]
    for target in (0.05, 0.4, 0.9, 1.2, 1.6, 2.5, 10.0):
        segs = plan_segments(info, target)
        covered = [i for s in segs for i in range(s.start, s.end)]
        assert covered == list(range(info.frames)), target
        assert all(s.start in info.keyframes for s in segs)
        assert all(s.pts_start == info.pts[s.start] for s in segs)
        assert all((s.pts_end is None) == (s.end == info.frames) for s in segs)
        assert segs[0].prev_pts is None and all(s.prev_pts == info.pts[s.start - 1]
                                                for s in segs[1:])
    assert len(plan_segments(info, 10.0)) == 1
    assert [(s.start, s.end) for s in plan_segments(info, 1.6)] == [(0, 24), (24, 36)]
    with pytest.raises(InvalidItem):
        plan_segments(info, 0)


@pytest.mark.parametrize("kind", ["mp4", "mkv", "webm", "avi"])
def test_segments_decode_exactly_the_frames_of_a_full_decode(videos, store, kind):
    full = [np.asarray(f) for f in decode_frames(videos[kind])]
    with open_video(store, videos[kind]) as src:
        info = src.info
    for seg in plan_segments(info, 1.0):
        # a worker opens the source with the plan's facts, not probing it again
        with open_video(store, videos[kind], info=VideoInfo.from_dict(info.as_dict())) as src:
            got = list(src.segment_frames(seg, previous=True))
        first = max(seg.start - 1, 0)
        assert [f.index for f in got] == list(range(first, seg.end))
        assert [f.pts for f in got] == list(info.pts[first:seg.end])
        for f in got:
            assert np.array_equal(np.asarray(f.image), full[f.index])


def test_frame_folder_is_a_video_in_natural_order(tmp_path, store):
    folder = tmp_path / "frames"
    make_frames(folder, count=12, name="shot_{}.png")
    (folder / "notes.txt").write_text("not a frame")
    with open_video(store, str(folder), fps=6) as src:
        info = src.info
        assert (info.kind, info.frames, info.fps, info.duration) == ("frames", 12, 6, 2.0)
        assert info.keyframes == tuple(range(12))
        seg = plan_segments(info, 1.0)[1]
        got = list(src.segment_frames(seg, previous=True))
    assert [f.index for f in got] == list(range(5, 12))
    ref = Image.open(folder / "shot_5.png").convert("RGB")
    assert np.array_equal(np.asarray(got[0].image), np.asarray(ref))
    assert sorted(["f10", "f2", "f1"], key=natural_key) == ["f1", "f2", "f10"]


def test_display_rotation_is_applied_like_players_do(tmp_path, store):
    import av

    path = str(tmp_path / "portrait.mp4")
    with av.open(path, "w") as out:
        vs = out.add_stream("libx264", rate=12)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        vs.set_display_rotation(90)  # counter-clockwise, as phones record portrait
        arr = np.zeros((48, 64, 3), np.uint8)
        arr[:, :8] = 255  # a white stripe on the left edge
        for i in range(3):
            f = av.VideoFrame.from_ndarray(arr, format="rgb24")
            f.pts = i
            for p in vs.encode(f):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
    with open_video(store, path) as src:
        assert (src.info.rotation, src.info.width, src.info.height) == (90, 48, 64)
        img = np.asarray(next(src.segment_frames(plan_segments(src.info)[0])).image)
    assert img.shape == (64, 48, 3)
    assert img[-8:].mean() > 250 and img[:-8].mean() < 5  # the left edge is now the bottom


# --- outputs -------------------------------------------------------------------------------
def test_output_spec_from_format_or_extension():
    assert output_spec("out.mp4") == output_spec("x.m4v")
    assert output_spec("out.mp4").container == "mp4" and output_spec("a.mov").container == "mov"
    assert output_spec("a.mkv").container == "matroska"
    assert output_spec("a.webm").format == "webm" and output_spec("a.webm").codec == "vp9"
    assert output_spec("s3://b/out/").format == "frames"
    assert output_spec("out_dir").format == "frames"
    assert output_spec("a.mp4", "webm").container == "webm"
    assert output_spec("a.mov", "mp4").container == "mov"
    assert output_spec("a.mp4", "frames").format == "frames"
    for bad in (("a.gif", None), ("a.mp4", "gif")):
        with pytest.raises(InvalidItem):
            output_spec(*bad)
    assert frame_name(0) == "frame_000001.png" and frame_name(999_999) == "frame_1000000.png"


def test_the_pypi_wheel_has_h264_and_vp9_encoders():
    enc = available_encoders()
    assert enc["h264"] == "libx264"
    assert enc["vp9"] == "libvpx-vp9"


def test_audio_is_copied_where_the_container_holds_it():
    assert audio_action("aac", "mp4") == "copy" and audio_action("opus", "mp4") == "copy"
    assert audio_action("pcm_s16le", "mp4") == "aac" and audio_action("pcm_s16le", "mov") == "copy"
    assert audio_action("aac", "webm") == "libopus" and audio_action("vorbis", "webm") == "copy"
    assert audio_action("anything", "matroska") == "copy"


# --- the warping error ----------------------------------------------------------------------
def test_warping_error_is_lower_for_smooth_output_than_for_shuffled(videos):
    inputs = [np.asarray(f) for f in decode_frames(videos["mp4"])]
    # a per-pixel stylization stand-in: temporally smooth because it follows its input
    outputs = [np.ascontiguousarray(255 - i[..., ::-1]) for i in inputs]
    smooth = warping_error(inputs, outputs)
    order = np.random.default_rng(0).permutation(len(outputs))
    shuffled = warping_error(inputs, [outputs[k] for k in order])
    assert smooth.pairs == 35
    assert smooth.value is not None and shuffled.value is not None
    assert smooth.value * 5 < shuffled.value
    # a still scene stylized the same way every frame is perfectly stable
    still = warping_error([inputs[0]] * 4, [outputs[0]] * 4)
    assert still.pairs == 3 and still.value == pytest.approx(0, abs=1e-5)


# --- hostile files and limits ------------------------------------------------------------------
def _hostile(tmp_path, videos):
    good = open(videos["mp4"], "rb").read()
    fast = open(make_video(tmp_path / "fast.mp4", faststart=True), "rb").read()
    mkv = open(videos["mkv"], "rb").read()
    cases = {
        "truncated-mkv": mkv[: len(mkv) * 2 // 3],
        "truncated": good[: len(good) // 2],
        "truncated-faststart": fast[: len(fast) * 2 // 3],
        "random": np.random.default_rng(0).bytes(50_000),
        "empty": b"",
        "text": b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n",
        "header-only": good[:64],
    }
    paths = {}
    for name, data in cases.items():
        p = tmp_path / (f"{name}.mkv" if name.endswith("mkv") else f"{name}.mp4")
        p.write_bytes(data)
        paths[name] = str(p)
    return paths


@pytest.mark.parametrize("case", ["truncated", "truncated-faststart", "truncated-mkv", "random",
                                  "empty", "text", "header-only"])
def test_hostile_videos_fail_bad_video(tmp_path, videos, store, case):
    path = _hostile(tmp_path, videos)[case]
    with pytest.raises(BadVideo) as err:
        with open_video(store, path) as src:
            # a file that probes must still fail when its frames are decoded
            for seg in plan_segments(src.info, 1.0):
                list(src.segment_frames(seg))
    assert err.value.code == "bad_video"


def test_limits_fail_too_large(videos, store):
    for limits, needle in ((VideoLimits(max_frames=35), "CAPVST_MAX_VIDEO_FRAMES"),
                           (VideoLimits(max_seconds=2.5), "CAPVST_MAX_VIDEO_SECONDS"),
                           (VideoLimits(max_bytes=1000), "CAPVST_MAX_VIDEO_BYTES"),
                           (VideoLimits(max_pixels=64 * 47), "pixel limit")):
        with pytest.raises(TooLarge, match=needle) as err:
            _info(store, videos["mp4"], limits=limits)
        assert err.value.code == "too_large"
    assert _info(store, videos["mp4"], limits=VideoLimits(max_frames=36, max_seconds=3)).frames \
        == 36


def test_missing_video_is_not_found(tmp_path, store):
    with pytest.raises(NotFound):
        _info(store, str(tmp_path / "nope.mp4"))
    with pytest.raises(NotFound):
        _info(store, str(tmp_path) + "/")  # a folder without frames


def test_sniff_names_the_demuxer():
    assert sniff(b"\x00\x00\x00\x18ftypisom") == "mov"
    assert sniff(b"\x1a\x45\xdf\xa3\x01\x00") == "matroska"
    assert sniff(b"RIFF\x00\x00\x00\x00AVI LIST") == "avi"
    assert sniff(b"#EXTM3U\nhttp://x") is None and sniff(b"") is None


# --- S3 ----------------------------------------------------------------------------------------
def test_s3_video_and_frame_prefix_read_in_ranges(videos, tmp_path, s3, bucket, moto_server,
                                                  monkeypatch):
    monkeypatch.setenv("CAPVST_S3_ENDPOINT_URL", moto_server.url)
    st = Storage(Settings(), confine_local=False)
    s3.upload_file(videos["mkv"], bucket, "in/clip.mkv")
    for p in make_frames(tmp_path / "fr", count=5, name="{}.jpg"):
        s3.upload_file(p, bucket, f"in/frames/{os.path.basename(p)}")
    local = _info(st, videos["mkv"])
    with open_video(st, f"s3://{bucket}/in/clip.mkv") as src:
        assert src.info == local
        seg = plan_segments(src.info, 1.0)[2]
        got = [np.asarray(f.image) for f in src.segment_frames(seg)]
    full = [np.asarray(f) for f in decode_frames(videos["mkv"])]
    assert all(np.array_equal(a, b) for a, b in zip(got, full[24:]))
    with open_video(st, f"s3://{bucket}/in/frames/", fps=5) as src:
        assert src.info.frames == 5 and src.info.duration == 1.0


def test_range_reader_fetches_blocks_and_reports_storage_faults():
    data = bytes(range(256)) * 40
    calls = []

    def fetch(start, length):
        calls.append((start, length))
        return data[start:start + length]

    r = RangeReader(fetch, len(data), block=1000, keep=2)
    assert r.read(10) == data[:10]
    r.seek(2995)
    assert r.read(10) == data[2995:3005]
    r.seek(-5, io.SEEK_END)
    assert r.read() == data[-5:]
    assert calls == [(0, 1000), (2000, 1000), (3000, 1000), (10000, 240)]

    from capvst.errors import StorageError

    def failing(start, length):
        raise StorageError("S3 503 reading s3://b/k")

    r = RangeReader(failing, 100)
    with pytest.raises(StorageError):
        r.read(5)
    assert isinstance(r.failure, StorageError)


# --- layering ----------------------------------------------------------------------------------
def test_probe_plan_join_import_no_torch():
    code = ("import capvst.video, capvst.video.probe, capvst.video.source, capvst.video.encode, "
            "capvst.video.run, capvst.video.warp, capvst.cli\n"
            "from capvst.video import plan_segments, join_video, open_video\n"
            "import sys; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         check=True)
    assert out.stdout.strip() == "False"


def test_missing_video_packages_say_how_to_install(monkeypatch, videos, store):
    from capvst.errors import ModelError

    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ModelError, match=r"pip install 'capvst\[video\]'"):
        _info(store, videos["mp4"])
    monkeypatch.setitem(sys.modules, "cv2", None)
    frame = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ModelError, match="OpenCV"):
        warping_error([frame, frame], [frame, frame])
