"""Video items end to end with the (untrained, seeded) network: segments stylized as separate
workers would, joined, compared frame by frame with stylizing each decoded frame as an image;
``capvst stylize`` on videos with masks and interpolation.

Codec tolerance: with x264 at CRF 18 and 4:2:0 chroma, the untrained network's saturated,
noise-like output at 64x48 comes back within a mean absolute difference of about 5 levels per
frame (measured on this clip: H.264 max 5.75, mean 4.86; VP9 max 6.47, mean 5.52); we assert
at most 10, and that each frame is at least
three times closer to its own expected frame than to its neighbours' (so no frame is shifted,
lost or duplicated). The ``frames`` format is compared exactly.
"""

from __future__ import annotations

import io
import os

import av
import numpy as np
import pytest
from PIL import Image

from capvst import load_model
from capvst.cli import _parser, _run
from capvst.settings import Settings
from capvst.storage import Storage
from capvst.stylize import Stylizer
from capvst.video import (
    FrameStylizer,
    Segment,
    VideoInfo,
    join_video,
    open_video,
    output_spec,
    plan_segments,
    read_segment_result,
    stylize_segment,
    warping_error,
)
from tests.data import image_bytes, mask_bytes
from tests.video_data import decode_frames, make_frames, make_video

pytestmark = pytest.mark.slow
MAX_SIZE = 64
CODEC_MAD_BOUND = 10.0


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """The 3 s, 12 fps, 64x48 clip with AAC audio and its style."""
    d = tmp_path_factory.mktemp("clip")
    video = make_video(d / "clip.mp4")
    style = Image.open(io.BytesIO(image_bytes((60, 40), seed=5))).convert("RGB")
    return {"dir": d, "video": video, "style": style}


@pytest.fixture(scope="module")
def store():
    return Storage(Settings(), confine_local=False)


_MODEL = []


def _model():
    if not _MODEL:
        _MODEL.append(load_model("photorealistic", warn=False))
    return _MODEL[0]


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def expected(clip, model):
    """Each decoded source frame stylized as an image."""
    stylizer = Stylizer(model, "cpu")
    return [stylizer.stylize(f, [clip["style"]], max_size=MAX_SIZE, style_keys=["s"])
            for f in decode_frames(clip["video"])]


def run_like_the_queue(store, video, out_uri, fmt, work, style, max_size=MAX_SIZE):
    """Probe and plan (scheduler), one fresh process state per segment (workers, in any
    order, given JSON payloads), then the join."""
    with open_video(store, video) as src:
        info = src.info
    payload = info.as_dict()
    segments = [s.as_dict() for s in plan_segments(info, 1.0)]
    spec = output_spec(out_uri, fmt)
    results = []
    for seg in reversed(segments):
        stylizer = Stylizer(_model(), "cpu")  # a fresh style cache, as on another worker
        frames = FrameStylizer(stylizer, [style], max_size=max_size, style_keys=["s"])
        with open_video(store, video, info=VideoInfo.from_dict(payload)) as src:
            results.append(stylize_segment(
                src, Segment.from_dict(seg), frames, spec, store,
                segment_uri=os.path.join(work, f"seg{seg['index']:03d}.mp4"), output_uri=out_uri))
    with open_video(store, video, info=VideoInfo.from_dict(payload)) as src:
        return join_video(src, results, spec, store, out_uri), results


@pytest.fixture(scope="module")
def mp4_run(clip, store, tmp_path_factory):
    work = tmp_path_factory.mktemp("segments")
    out = str(work / "out.mp4")
    video, results = run_like_the_queue(store, clip["video"], out, None, str(work), clip["style"])
    return {"out": out, "video": video, "results": results, "work": work}


def _streams(path):
    c = av.open(path)
    v = c.streams.video[0]
    a = c.streams.audio[0] if c.streams.audio else None
    return c, v, a


def _audio_packets(path):
    with av.open(path) as c:
        return [(p.pts, bytes(p)) for p in c.demux(audio=0) if p.size]


def test_joined_video_keeps_frames_size_rate_timing_and_audio(clip, mp4_run):
    video = mp4_run["video"]
    assert (video.frames, video.segments, video.width, video.height) == (36, 3, 64, 48)
    assert len(mp4_run["results"]) == 3
    src, sv, sa = _streams(clip["video"])
    out, ov, oa = _streams(mp4_run["out"])
    with src, out:
        assert out.format.name.startswith("mov,mp4")
        assert ov.codec_context.name == "h264"
        assert (ov.codec_context.width, ov.codec_context.height) == (64, 48)
        assert ov.average_rate == sv.average_rate == 12
        src_pts = sorted(p.pts * p.time_base for p in src.demux(sv) if p.size)
        out_pts = sorted(p.pts * p.time_base for p in out.demux(ov) if p.size)
        assert out_pts == src_pts  # every frame once, at the source's time
        assert float(ov.duration * ov.time_base) == pytest.approx(3.0, abs=1e-6)
        assert oa is not None and oa.codec_context.name == sa.codec_context.name == "aac"
        frame = 1 / 12
        assert float(oa.duration * oa.time_base) == pytest.approx(
            float(sa.duration * sa.time_base), abs=frame)
    assert _audio_packets(mp4_run["out"]) == _audio_packets(clip["video"])  # stream copy
    assert video.audio == "copy"


def test_every_frame_matches_image_stylization_within_codec_tolerance(mp4_run, expected):
    got = [np.asarray(f, dtype=np.int16) for f in decode_frames(mp4_run["out"])]
    assert len(got) == len(expected) == 36
    exp = [e.astype(np.int16) for e in expected]
    mads = [float(np.abs(g - e).mean()) for g, e in zip(got, exp)]
    assert max(mads) <= CODEC_MAD_BOUND, mads
    for i, g in enumerate(got):
        for j in (i - 1, i + 1):
            if 0 <= j < len(exp):
                assert float(np.abs(g - exp[j]).mean()) > 3 * mads[i], (i, j)


def test_segment_figures_add_up_and_beat_shuffled_frames(clip, mp4_run, expected):
    inputs = [np.asarray(f.resize((64, 48))) for f in decode_frames(clip["video"])]
    whole = warping_error(inputs, expected)
    parts = mp4_run["results"]
    assert sum(r.warp_pairs for r in parts) == whole.pairs == 35
    assert mp4_run["video"].warping_error == pytest.approx(whole.value, rel=1e-9)
    order = np.random.default_rng(1).permutation(len(expected))
    shuffled = warping_error(inputs, [expected[k] for k in order])
    assert whole.value is not None and shuffled.value is not None
    assert whole.value * 2 < shuffled.value


def test_a_finished_segment_is_not_run_again(clip, store, mp4_run):
    work = mp4_run["work"]
    seg_uri = os.path.join(str(work), "seg001.mp4")
    stored = read_segment_result(store, seg_uri)
    assert stored is not None and stored.frames == 12
    before = os.stat(seg_uri).st_mtime_ns

    class NoModel:
        masked = False

        def frame_size(self, w, h):
            return w, h

        def __call__(self, *_):
            raise AssertionError("a finished segment ran the model again")

    with open_video(store, clip["video"]) as src:
        seg = plan_segments(src.info, 1.0)[1]
        again = stylize_segment(src, seg, NoModel(), output_spec(seg_uri), store,  # type: ignore[arg-type]
                                segment_uri=seg_uri)
    assert again == stored and os.stat(seg_uri).st_mtime_ns == before


def test_frames_format_is_exact(clip, store, expected, tmp_path):
    out = str(tmp_path / "frames") + "/"
    video, _ = run_like_the_queue(store, clip["video"], out, "frames", str(tmp_path),
                                  clip["style"])
    names = sorted(os.listdir(out))
    assert names == [f"frame_{i:06d}.png" for i in range(1, 37)]
    for name, e in zip(names, expected):
        assert np.array_equal(np.asarray(Image.open(os.path.join(out, name))), e), name
    assert video.frames == 36 and video.audio is None


def test_webm_output_with_aac_source_transcodes_audio_to_opus(clip, store, tmp_path, model):
    small = make_video(tmp_path / "small.mp4", seconds=2, size=(32, 24))
    out = str(tmp_path / "out.webm")
    video, _ = run_like_the_queue(store, small, out, None, str(tmp_path), clip["style"],
                                  max_size=32)
    assert video.audio == "libopus" and video.segments == 2
    c, v, a = _streams(out)
    with c:
        assert v.codec_context.name == "vp9" and a is not None and a.codec_context.name == "opus"
        got = [f.to_ndarray(format="rgb24").astype(np.int16) for f in c.decode(v)]
        assert float(c.duration / 1e6) == pytest.approx(2.0, abs=1 / 12 + 0.03)
    stylizer = Stylizer(model, "cpu")
    want = [stylizer.stylize(f, [clip["style"]], max_size=32).astype(np.int16)
            for f in decode_frames(small)]
    assert len(got) == len(want) == 24
    assert max(float(np.abs(g - e).mean()) for g, e in zip(got, want)) <= CODEC_MAD_BOUND


# --- the command ------------------------------------------------------------------------------
def run(argv, capsys):
    code = _run(argv, _parser)
    return code, capsys.readouterr().err


def test_cli_stylizes_a_video_end_to_end(clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CAPVST_VIDEO_SEGMENT_SECONDS", "1")
    style = tmp_path / "style.png"
    clip["style"].save(style)
    small = make_video(tmp_path / "small.mov", seconds=2, size=(32, 24), fmt="mov")
    out = tmp_path / "out.mp4"
    code, err = run(["stylize", small, "--style", str(style), "--max-size", "32", "-o",
                     str(out)], capsys)
    assert code == 0, err
    assert "24/24 frames" in err and "2 segments" in err and "warping error" in err
    c, v, a = _streams(str(out))
    with c:
        assert v.frames == 24 and v.average_rate == 12 and a is not None
        assert (v.codec_context.width, v.codec_context.height) == (32, 24)
    # hostile input: one line, exit 1
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(os.urandom(5000))
    code, err = run(["stylize", str(bad), "--style", str(style), "-o", str(tmp_path / "b.mp4")],
                    capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("capvst: error:") and "video" in err
    monkeypatch.setenv("CAPVST_MAX_VIDEO_FRAMES", "10")
    code, err = run(["stylize", small, "--style", str(style), "-o", str(tmp_path / "c.mp4")],
                    capsys)
    assert code == 1 and "CAPVST_MAX_VIDEO_FRAMES" in err
    assert not (tmp_path / "b.mp4").exists() and not (tmp_path / "c.mp4").exists()


def test_cli_video_with_per_frame_masks_and_interpolation_is_exact(tmp_path, capsys):
    size = (32, 24)
    frames_dir = tmp_path / "frames"
    paths = make_frames(frames_dir, count=6, size=size, name="img_{}.png")
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    for i in range(6):  # the boundary moves with the frame number
        (masks_dir / f"m{i}.png").write_bytes(mask_bytes(size, split=0.3 + 0.05 * i))
    s1, s2 = tmp_path / "s1.png", tmp_path / "s2.png"
    s1.write_bytes(image_bytes((40, 30), seed=7))
    s2.write_bytes(image_bytes((36, 28), seed=8))
    smask = tmp_path / "smask.png"
    smask.write_bytes(mask_bytes((40, 30), split=0.6))
    stylizer = Stylizer(_model(), "cpu")
    s1_img = Image.open(s1).convert("RGB")
    s2_img = Image.open(s2).convert("RGB")

    out = tmp_path / "masked"
    code, err = run(["stylize", str(frames_dir), "--style", str(s1), "--content-mask",
                     str(masks_dir) + "/", "--style-mask", str(smask), "--alpha-c", "0.2",
                     "--fps", "6", "--max-size", "32", "--format", "frames", "-o", str(out)],
                    capsys)
    assert code == 0, err
    for i, p in enumerate(paths):
        want = stylizer.stylize(Image.open(p).convert("RGB"), [s1_img], max_size=32,
                                alpha_c=0.2, content_mask=(masks_dir / f"m{i}.png").read_bytes(),
                                style_mask=smask.read_bytes())
        got = np.asarray(Image.open(out / f"frame_{i + 1:06d}.png"))
        assert np.array_equal(got, want), i

    out = tmp_path / "mixed"
    code, err = run(["stylize", str(frames_dir) + "/", "--style", str(s1), "--style", str(s2),
                     "--style-weights", "0.3,0.7", "--alpha-c", "0.4", "--max-size", "32", "-o",
                     str(out) + "/"], capsys)
    assert code == 0, err
    for i, p in enumerate(paths):
        want = stylizer.stylize(Image.open(p).convert("RGB"), [s1_img, s2_img],
                                weights=[0.3, 0.7], alpha_c=0.4, max_size=32)
        assert np.array_equal(np.asarray(Image.open(out / f"frame_{i + 1:06d}.png")), want)

    one_mask = tmp_path / "one-mask.png"
    one_mask.write_bytes(mask_bytes(size, split=0.5))
    video = make_video(tmp_path / "v.mkv", seconds=1, size=size, audio=None)
    out = tmp_path / "one"
    code, err = run(["stylize", video, "--style", str(s1), "--content-mask", str(one_mask),
                     "--style-mask", str(smask), "--max-size", "32", "-o", str(out) + "/"],
                    capsys)
    assert code == 0, err
    for i, f in enumerate(decode_frames(video)):
        want = stylizer.stylize(f, [s1_img], max_size=32, content_mask=one_mask.read_bytes(),
                                style_mask=smask.read_bytes())
        assert np.array_equal(np.asarray(Image.open(out / f"frame_{i + 1:06d}.png")), want)


def test_segments_and_join_on_s3(clip, tmp_path, s3, bucket, moto_server, monkeypatch, model):
    """Source, segments and output in object storage, as the queue will have them."""
    monkeypatch.setenv("CAPVST_S3_ENDPOINT_URL", moto_server.url)
    st = Storage(Settings(), confine_local=False)
    small = make_video(tmp_path / "small.mp4", seconds=2, size=(32, 24))
    s3.upload_file(small, bucket, "in/small.mp4")
    src_uri, out_uri = f"s3://{bucket}/in/small.mp4", f"s3://{bucket}/out/small.mp4"
    video, results = run_like_the_queue(st, src_uri, out_uri, None, f"s3://{bucket}/_seg",
                                        clip["style"], max_size=32)
    assert video.frames == 24 and video.segments == 2 and video.audio == "copy"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"out/small.mp4", "_seg/seg000.mp4", "_seg/seg000.mp4.json",
            "_seg/seg001.mp4.json"} <= keys
    s3.download_file(bucket, "out/small.mp4", str(tmp_path / "got.mp4"))
    got = decode_frames(str(tmp_path / "got.mp4"))
    stylizer = Stylizer(model, "cpu")
    want = [stylizer.stylize(f, [clip["style"]], max_size=32) for f in decode_frames(small)]
    assert len(got) == 24
    assert max(float(np.abs(np.asarray(g, np.int16) - w.astype(np.int16)).mean())
               for g, w in zip(got, want)) <= CODEC_MAD_BOUND
    assert video.written
    # a second join (a redelivered task) keeps the finished output
    etag = s3.head_object(Bucket=bucket, Key="out/small.mp4")["ETag"]
    with open_video(st, src_uri) as src:
        again = join_video(src, results, output_spec(out_uri), st, out_uri)
    assert not again.written and again.frames == 24
    assert s3.head_object(Bucket=bucket, Key="out/small.mp4")["ETag"] == etag
