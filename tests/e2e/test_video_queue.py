"""Video items through the queue: a test clip split into segments over two workers, joined,
compared frame by frame with ``capvst stylize`` of each decoded frame; a worker killed
mid-segment.

Codec tolerance (as in tests/capvst/test_video_pipeline.py): H.264 at CRF 18 with 4:2:0
chroma returns each 64x48 frame of the reference checkpoint within a mean absolute difference
of about 5 levels (measured on this clip through the queue: max 5.75, mean 4.86 per frame,
the same as in one process); we assert at most 10 per frame, and that every frame is at
least three times closer to its own expected frame than to its neighbours' (none shifted,
lost or duplicated). ``format: frames`` is compared exactly.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tests.data import image_bytes
from tests.services import Cluster, wait_for
from tests.video_data import decode_frames, make_video

pytestmark = pytest.mark.slow
MAX_SIZE = 64
CODEC_MAD_BOUND = 10.0
SETTINGS = dict(video_segment_seconds="1", torch_threads="1")


def _submit(c: Cluster, folder: Path, lines: list[dict], max_size: int) -> str:
    manifest = folder / "in" / "m.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    proc = c.submit(str(manifest), "--output", f"file://{folder}/out", "--max-size",
                    str(max_size))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[0]


def _wait_done(c: Cluster, job: str, timeout: float) -> dict:
    def done():
        proc = c.capvst("status", job, "--json", timeout=60)
        st = json.loads(proc.stdout) if proc.returncode == 0 else None
        return st if st and st["state"] in ("done", "cancelled") else None

    return wait_for(done, timeout, f"job {job} to finish", interval=0.5)


def _report(folder: Path, job: str) -> list[dict]:
    text = (folder / "out" / "_capvst" / job / "report.jsonl").read_text()
    return [json.loads(x) for x in text.splitlines()]


def _inputs(folder: Path, **video) -> None:
    (folder / "in").mkdir(parents=True)
    make_video(folder / "in" / "clip.mp4", **video)
    (folder / "in" / "s.png").write_bytes(image_bytes((60, 40), seed=5))


@pytest.fixture(scope="module")
def queued(tmp_path_factory):
    """One job with the clip twice (MP4 and PNG frames), two workers, 1 s segments."""
    folder = tmp_path_factory.mktemp("videoq")
    _inputs(folder)
    c = Cluster(folder, None, **SETTINGS)
    try:
        c.scheduler().wait_ready()
        workers = [c.worker("w1").wait_ready(), c.worker("w2").wait_ready()]
        job = _submit(c, folder, [{"content": "clip.mp4", "style": "s.png"},
                                  {"content": "clip.mp4", "style": "s.png", "format": "frames",
                                   "output": "frames/"}], MAX_SIZE)
        status = _wait_done(c, job, 600)
        yield {"c": c, "folder": folder, "job": job, "status": status, "workers": workers,
               "rows": _report(folder, job)}
    finally:
        c.stop()


@pytest.fixture(scope="module")
def expected(queued):
    """``capvst stylize`` of each decoded source frame, as an image, with the workers'
    checkpoint."""
    from capvst import images, load_model
    from capvst.stylize import Stylizer

    c, folder = queued["c"], queued["folder"]
    model = load_model("photorealistic", c.env["CAPVST_CHECKPOINT_PHOTOREALISTIC"], warn=False)
    stylizer = Stylizer(model, "cpu")
    style = images.decode_image((folder / "in" / "s.png").read_bytes())
    return [stylizer.stylize(f, [style], max_size=MAX_SIZE, style_keys=["s"])
            for f in decode_frames(str(folder / "in" / "clip.mp4"))]


def test_video_item_is_split_over_two_workers_and_joined(queued):
    st, rows = queued["status"], queued["rows"]
    assert (st["succeeded"], st["failed"]) == (2, 0), rows
    for r in rows:
        assert r["status"] == "succeeded", r
        assert (r["frames"], r["segments"]) == (36, 3), r
        assert set(r["video_seconds"]) >= {"decode", "model", "encode", "join"}
    # every worker ran segments: the six segments spread over both
    for w in queued["workers"]:
        assert "capvst.video.segment[" in w.log() and " succeeded in " in w.log(), w.name
    ran = [w.log().count("Task capvst.video.segment[") for w in queued["workers"]]
    assert all(n > 0 for n in ran) and sum(ran) >= 6, ran
    # segment results (with their timings) stay; segment media are dropped after the join
    seg_dir = queued["folder"] / "out" / "_capvst" / queued["job"] / "video" / "1"
    assert sorted(p.name for p in seg_dir.iterdir()) == [
        "plan.json", "result.json", "seg-0000.mp4.json", "seg-0001.mp4.json",
        "seg-0002.mp4.json"]
    assert json.loads((seg_dir / "seg-0001.mp4.json").read_text())["seconds"]["model"] > 0


def test_output_keeps_frames_size_rate_duration_and_audio(queued):
    src_path = str(queued["folder"] / "in" / "clip.mp4")
    out_path = queued["rows"][0]["output"][len("file://"):]
    assert out_path.endswith("/out/clip__s.mp4")
    with av.open(src_path) as src, av.open(out_path) as out:
        sv, ov = src.streams.video[0], out.streams.video[0]
        n_out = sum(1 for _ in out.decode(ov))
        assert n_out == 36
        assert (ov.codec_context.width, ov.codec_context.height) == (64, 48)
        assert ov.codec_context.name == "h264"
        assert ov.average_rate == sv.average_rate == 12
        assert abs(out.duration / 1e6 - src.duration / 1e6) < 0.1
        assert out.streams.audio, "the audio stream was dropped"
    with av.open(src_path) as src, av.open(out_path) as out:
        a_src = [bytes(p) for p in src.demux(audio=0) if p.size]
        a_out = [bytes(p) for p in out.demux(audio=0) if p.size]
    assert a_src == a_out  # copied packet for packet


def test_every_frame_matches_stylize_within_codec_tolerance(queued, expected):
    out_path = queued["rows"][0]["output"][len("file://"):]
    got = [np.asarray(f, dtype=np.float32) for f in decode_frames(out_path)]
    exp = [e.astype(np.float32) for e in expected]
    assert len(got) == len(exp) == 36
    mads = [float(np.abs(g - e).mean()) for g, e in zip(got, exp)]
    assert max(mads) <= CODEC_MAD_BOUND, mads
    for i, g in enumerate(got):
        for j in (i - 1, i + 1):
            if 0 <= j < len(exp):
                assert float(np.abs(g - exp[j]).mean()) > 3 * mads[i], (i, j)


def test_frames_format_is_exact(queued, expected):
    row = queued["rows"][1]
    folder = Path(row["output"][len("file://"):])
    names = sorted(os.listdir(folder))
    assert names == [f"frame_{i:06d}.png" for i in range(1, 37)]
    for name, e in zip(names, expected):
        assert np.array_equal(np.asarray(Image.open(folder / name).convert("RGB")), e), name


def test_report_carries_the_warping_error_and_it_measures_stability(queued):
    from capvst import images
    from capvst.video import warping_error

    row = queued["rows"][1]
    assert isinstance(row["warping_error"], float) and row["warping_error"] > 0
    assert queued["rows"][0]["warping_error"] == pytest.approx(row["warping_error"])
    folder = Path(row["output"][len("file://"):])
    outs = [np.asarray(Image.open(folder / n).convert("RGB")) for n in sorted(os.listdir(folder))]
    ins = [np.asarray(images.resize(f, MAX_SIZE))
           for f in decode_frames(str(queued["folder"] / "in" / "clip.mp4"))]
    # the report's figure is the one of the output frames in order ...
    assert warping_error(ins, outs).value == pytest.approx(row["warping_error"], rel=1e-4)
    # ... and the same frames shuffled (temporally incoherent) score clearly worse
    order = list(range(len(outs)))
    random.Random(3).shuffle(order)
    shuffled = warping_error(ins, [outs[i] for i in order]).value
    assert shuffled > 1.5 * row["warping_error"], (shuffled, row["warping_error"])


def test_worker_killed_mid_segment_still_gives_every_frame_once(tmp_path):
    _inputs(tmp_path, size=(192, 144))
    c = Cluster(tmp_path, None, **SETTINGS)
    try:
        c.scheduler().wait_ready()
        w1 = c.worker("w1").wait_ready()
        job = _submit(c, tmp_path, [{"content": "clip.mp4", "style": "s.png"}], 192)
        r = c.redis.client()

        def segment_running():
            ids = re.findall(r"Task capvst\.video\.segment\[([0-9a-f-]+)\]", w1.log())
            return next((i for i in ids if r.exists(f"capvst:lease:{i}")), None)

        task = wait_for(segment_running, 120, "w1 to start a segment", interval=0.05)
        time.sleep(0.5)
        assert r.exists(f"capvst:lease:{task}"), "the segment finished before the kill"
        w1.kill_group()  # the whole node, no warning
        c.worker("w2").wait_ready()
        st = _wait_done(c, job, 600)
        rows = _report(tmp_path, job)
        assert (st["succeeded"], st["failed"]) == (1, 0), rows
        row = rows[0]
        assert row["worker"].startswith("w2@")
        assert row["attempts"] >= 2, row  # the killed segment ran again
        out_path = row["output"][len("file://"):]
        with av.open(str(tmp_path / "in" / "clip.mp4")) as src:
            src_pts = sorted(p.pts for p in src.demux(video=0) if p.size)
        with av.open(out_path) as out:
            out_pts = [f.pts for f in out.decode(video=0)]
        assert len(out_pts) == len(set(out_pts)) == 36
        assert out_pts == src_pts  # every source frame once, in order, at its time
    finally:
        c.stop()


def test_undecodable_and_too_long_videos_fail_their_item_only(tmp_path):
    (tmp_path / "in").mkdir()
    make_video(tmp_path / "in" / "ok.mp4", seconds=1.0)
    (tmp_path / "in" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    (tmp_path / "in" / "s.png").write_bytes(image_bytes((60, 40), seed=5))
    make_video(tmp_path / "in" / "long.mp4", seconds=2.0)
    c = Cluster(tmp_path, None, max_video_frames="20", **SETTINGS)
    try:
        c.scheduler().wait_ready()
        w1 = c.worker("w1").wait_ready()
        job = _submit(c, tmp_path, [{"content": "broken.mp4", "style": "s.png"},
                                    {"content": "long.mp4", "style": "s.png"},
                                    {"content": "ok.mp4", "style": "s.png"}], MAX_SIZE)
        _wait_done(c, job, 300)
        rows = _report(tmp_path, job)
        assert [(r["status"], (r["error"] or {}).get("code")) for r in rows] == [
            ("failed", "bad_video"), ("failed", "too_large"), ("succeeded", None)], rows
        assert rows[2]["frames"] == 12
        assert w1.proc.poll() is None
    finally:
        c.stop()
