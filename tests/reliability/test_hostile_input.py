"""Hostile and broken input: each bad item fails alone with its code; the job goes on."""

from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from tests.data import image_bytes
from tests.reliability.helpers import output_versions, report
from tests.services import Cluster


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _images() -> dict[str, bytes]:
    photo = Image.open(io.BytesIO(image_bytes((80, 60), seed=1))).convert("RGB")
    jpeg = _png(photo, "JPEG")
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gif, webp = io.BytesIO(), io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    frames[0].save(webp, format="WEBP", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 80x60, displayed rotated: 60x80
    sixteen = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    return {
        "good.jpg": jpeg,
        "corrupt.jpg": os.urandom(3000),
        "truncated.jpg": jpeg[: len(jpeg) // 3],
        "empty.png": b"",
        "text.jpg": b"<html>not an image</html>\n" * 20,
        "bomb.png": _png(Image.new("1", (16000, 16000))),
        "huge.png": _png(Image.new("RGB", (2500, 2500))),
        "one.png": _png(Image.new("RGB", (1, 1))),
        "three.png": _png(Image.new("RGB", (3, 3))),
        "anim.gif": gif.getvalue(),
        "anim.webp": webp.getvalue(),
        "cmyk.jpg": _png(photo.convert("CMYK"), "JPEG"),
        "sixteen.png": _png(Image.fromarray(sixteen)),
        "palette.png": _png(photo.convert("P")),
        "alpha.png": _png(photo.convert("RGBA")),
        "rotated.jpg": _png(photo, "JPEG", exif=exif.tobytes()),
        "style.png": image_bytes((64, 64), seed=9),
    }


def test_hostile_items_fail_alone(tmp_path, moto_server, s3, vbucket):
    root = tmp_path / "root"
    (root / "local").mkdir(parents=True)
    (root / "local" / "ok.png").write_bytes(image_bytes((64, 48), seed=5))
    (tmp_path / "secret.png").write_bytes(image_bytes((64, 48), seed=6))
    c = Cluster(tmp_path, moto_server.url, allowed_buckets=vbucket, max_pixels="4000000",
                chunk_size="4")
    c.env["CAPVST_LOCAL_ROOT"] = str(root)
    try:
        for name, data in _images().items():
            s3.put_object(Bucket=vbucket, Key=f"in/{name}", Body=data)
        s3.create_bucket(Bucket=vbucket + "-other")
        s3.put_object(Bucket=vbucket + "-other", Key="x.png", Body=image_bytes())
        st = "style.png"
        expect: list[tuple[object, str]] = [
            ({"content": "corrupt.jpg", "style": st}, "bad_image"),
            ({"content": "truncated.jpg", "style": st}, "bad_image"),
            ({"content": "empty.png", "style": st}, "bad_image"),
            ({"content": "text.jpg", "style": st}, "bad_image"),
            ({"content": "bomb.png", "style": st}, "too_large"),
            ({"content": "huge.png", "style": st}, "too_large"),
            ({"content": "one.png", "style": st}, "too_small"),
            ({"content": "three.png", "style": st}, "too_small"),
            ({"content": "anim.gif", "style": st}, "succeeded"),
            ({"content": "anim.webp", "style": st, "output": "anim-webp.png"}, "succeeded"),
            ({"content": "cmyk.jpg", "style": st}, "succeeded"),
            ({"content": "sixteen.png", "style": st}, "succeeded"),
            ({"content": "palette.png", "style": st}, "succeeded"),
            ({"content": "alpha.png", "style": st}, "succeeded"),
            ({"content": "rotated.jpg", "style": st}, "succeeded"),
            ("this is not json", "invalid_item"),
            ({"content": "good.jpg", "style": st, "colour": "red"}, "invalid_item"),
            ({"content": "good.jpg", "style": st, "max_size": "big"}, "invalid_item"),
            ({"content": "good.jpg", "style": st, "alpha_c": 2}, "invalid_item"),
            ({"content": "good.jpg", "style": st, "output": "same.png"}, "succeeded"),
            ({"content": "cmyk.jpg", "style": st, "output": "same.png"}, "duplicate_output"),
            ({"content": f"s3://{vbucket}-other/x.png", "style": st}, "access_denied"),
            ({"content": f"file://{tmp_path}/secret.png", "style": st,
              "output": "secret.png"}, "access_denied"),
            ({"content": f"file://{root}/local/../../secret.png", "style": st,
              "output": "dots.png"}, "access_denied"),
            ({"content": "../../../etc/passwd", "style": st}, "access_denied"),
            ({"content": f"file://{root}/local/ok.png", "style": st}, "succeeded"),
            ({"content": "good.jpg", "style": "corrupt.jpg", "output": "bad-style.png"},
             "bad_image"),
        ]
        body = "\n".join(x if isinstance(x, str) else json.dumps(x) for x, _ in expect) + "\n"
        s3.put_object(Bucket=vbucket, Key="in/hostile.jsonl", Body=body.encode())
        c.scheduler().wait_ready()
        w = c.worker("w1").wait_ready()
        proc = c.submit(f"s3://{vbucket}/in/hostile.jsonl", "--output", f"s3://{vbucket}/out",
                        "--max-size", "96", "--wait", "--json", timeout=400)
        assert proc.returncode == 3, proc.stderr
        rows = report(s3, vbucket, "out", json.loads(proc.stdout)["job"])
        assert [r["line"] for r in rows] == list(range(1, len(expect) + 1))
        got = [r["status"] if r["status"] != "failed" else r["error"]["code"] for r in rows]
        assert got == [e for _, e in expect], list(zip(got, [e for _, e in expect]))
        # the rotated photo came out upright (stored 80x60, displayed 60x80)
        rotated = s3.get_object(Bucket=vbucket, Key="out/rotated__style.png")["Body"].read()
        assert Image.open(io.BytesIO(rotated)).size == (60, 80)
        assert not (root / "local" / "secret__style.png").exists()
        assert all(v == 1 for v in output_versions(s3, vbucket, "out").values())
        assert w.proc.poll() is None
    finally:
        c.stop()


def test_broken_manifests(tmp_path, moto_server, s3, vbucket):
    c = Cluster(tmp_path, moto_server.url, allowed_buckets=vbucket)
    try:
        c.scheduler().wait_ready()
        s3.put_object(Bucket=vbucket, Key="style.png", Body=image_bytes((48, 48)))
        s3.put_object(Bucket=vbucket, Key="empty.jsonl", Body=b"")
        s3.put_object(Bucket=vbucket, Key="binary.jsonl", Body=os.urandom(20000))
        # one 30 MB line between two good lines: refused alone, never held whole
        giant = (b'{"content": "style.png", "style": "style.png"}\n'
                 + b'{"content": "' + b"x" * 30_000_000 + b'"}\n'
                 + b'{"content": "style.png", "style": "style.png", "output": "b.png"}\n')
        s3.put_object(Bucket=vbucket, Key="giant.jsonl", Body=giant)
        c.worker("w1").wait_ready()

        def run(key: str, *extra: str):
            proc = c.submit(f"s3://{vbucket}/{key}", "--output", f"s3://{vbucket}/o-{key}",
                            "--max-size", "48", "--wait", "--json", *extra, timeout=300)
            out = json.loads(proc.stdout) if proc.stdout.strip() else {}
            return proc.returncode, out, proc.stderr

        code, out, err = run("empty.jsonl")
        assert code == 2 and out["total"] == 0, err
        assert report(s3, vbucket, "o-empty.jsonl", out["job"]) == []
        code, out, err = run("binary.jsonl")
        assert code == 2, err
        rows = report(s3, vbucket, "o-binary.jsonl", out["job"])
        assert rows and {r["error"]["code"] for r in rows} == {"invalid_item"}
        code, out, err = run("giant.jsonl")
        assert code == 3, err
        rows = report(s3, vbucket, "o-giant.jsonl", out["job"])
        assert [(r["line"], r["status"]) for r in rows] == [
            (1, "succeeded"), (2, "failed"), (3, "succeeded")]
        assert "longer than" in rows[1]["error"]["message"]
        # an output prefix that cannot be written: refused before anything is queued
        for prefix in (f"s3://{vbucket}-missing/out", "s3://not-allowed-bucket/out"):
            proc = c.submit(f"s3://{vbucket}/giant.jsonl", "--output", prefix)
            assert proc.returncode == 2 and "not writable" in proc.stderr, proc.stderr
    finally:
        c.stop()
