"""URL list -> img2dataset shards -> capfilt, against a real HTTP server on 127.0.0.1."""

import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from pipelines.cli import main

COLOURS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 220, 30)]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path
        if path.startswith("/img/"):
            return self._image(int(path.split("/")[-1].split(".")[0]))
        if path == "/slow.jpg":
            time.sleep(1.5)
            return self._image(1)
        if path == "/redirect.jpg":
            self.send_response(302)
            self.send_header("Location", "/img/2.jpg")
            self.end_headers()
            return None
        if path == "/corrupt.jpg":
            return self._send(b"\xff\xd8\xff\xe0 these are not the bytes of an image", "image/jpeg")
        self.send_error(404)
        return None

    def _image(self, n: int):
        buf = io.BytesIO()
        Image.new("RGB", (80 + n, 60), COLOURS[n % len(COLOURS)]).save(buf, format="JPEG")
        return self._send(buf.getvalue(), "image/jpeg")

    def _send(self, body: bytes, content_type: str):
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def url_rows(base):
    good = [(f"{base}/img/{n}.jpg", f"a picture number {n}") for n in range(8)]
    bad = [(f"{base}/missing/{n}.jpg", "gone") for n in range(2)] + [(f"{base}/corrupt.jpg", "corrupt")]
    odd = [(f"{base}/slow.jpg", "a slow one"), (f"{base}/redirect.jpg", "a redirected one")]
    return good + bad + odd  # 10 downloadable, 3 not


@pytest.fixture(scope="module")
def url_list(server, tmp_path_factory):
    path = tmp_path_factory.mktemp("urls") / "urls.parquet"
    rows = url_rows(server)
    pq.write_table(pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows]}), path)
    return path


def model_overrides(tiny_models):
    return [f"captioner.model={tiny_models[0]}", f"filter.model={tiny_models[1]}",
            "captioner.num_captions=2", "filter.threshold=0.4633"]


DOWNLOAD = ["download.number_sample_per_shard=5", "download.thread_count=4", "download.image_size=64",
            "download.timeout=5"]


def test_download_writes_img2dataset_shards_then_run_cleans_them(server, url_list, tiny_models, tmp_path):
    shards = tmp_path / "shards"
    rc = main(["download", "--config", "configs/tiny.yaml", "--url-list", str(url_list),
               "--output", str(shards), *DOWNLOAD])
    assert rc == 0
    names = sorted(os.listdir(shards))
    tars = [n for n in names if n.endswith(".tar")]
    assert tars == ["00000.tar", "00001.tar", "00002.tar"]  # 13 URLs, 5 per shard
    for tar in tars:
        assert f"{tar[:-4]}.parquet" in names and f"{tar[:-4]}_stats.json" in names
    columns = pq.read_table(shards / "00000.parquet").column_names
    for column in ("url", "caption", "key", "status", "error_message", "width", "height",
                   "original_width", "original_height", "sha256"):
        assert column in columns
    meta = [pq.read_table(shards / f"{t[:-4]}.parquet").to_pylist() for t in tars]
    meta = [r for shard in meta for r in shard]
    by_url = {r["url"]: r for r in meta}
    assert sum(r["status"] == "success" for r in meta) == 10
    assert by_url[server + "/missing/0.jpg"]["status"] == "failed_to_download"
    assert by_url[server + "/corrupt.jpg"]["status"] != "success"
    assert by_url[server + "/redirect.jpg"]["status"] == "success"
    assert by_url[server + "/slow.jpg"]["status"] == "success"

    out = tmp_path / "clean"
    rc = main(["run", "--config", "configs/tiny.yaml", "--input", str(shards), "--output", str(out),
               "--no-progress", *model_overrides(tiny_models)])
    assert rc == 0
    rows = [r for t in tars for r in pq.read_table(out / f"{t[:-4]}.parquet").to_pylist()]
    assert len(rows) == 10
    successes = {r["key"]: r for r in meta if r["status"] == "success"}
    for row in rows:
        source = successes[row["key"]]
        assert (row["url"], row["sha256"]) == (source["url"], source["sha256"])
        assert (row["original_width"], row["original_height"]) == (source["original_width"],
                                                                   source["original_height"])
        assert json.loads(row["input_json"])["caption"] == source["caption"] == row["web_text"]
    kept = [r for r in rows if r["status"] == "kept"]
    records = list(wds.WebDataset([str(out / t) for t in tars], shardshuffle=False, empty_check=False)
                   .decode("pil").to_tuple("jpg;png;jpeg;webp", "txt", "json"))
    assert len(records) == len(kept) > 0
    for image, text, meta_json in records:
        assert min(image.size) <= 64 and text  # keep_ratio, only if bigger
        assert meta_json["sha256"] and meta_json["capfilt"]["text"] == text


@pytest.mark.parametrize("fmt", ["csv", "tsv", "txt"])
def test_url_list_formats(server, tmp_path, fmt, tiny_models):
    rows = url_rows(server)[:3]
    path = tmp_path / f"urls.{fmt}"
    if fmt == "txt":
        path.write_text("".join(f"{u}\n" for u, _ in rows))
    else:
        sep = "," if fmt == "csv" else "\t"
        path.write_text(f"url{sep}caption\n" + "".join(f"{u}{sep}{c}\n" for u, c in rows))
    rc = main(["download", "--config", "configs/tiny.yaml", "--url-list", str(path),
               "--output", str(tmp_path / "shards"), *DOWNLOAD])
    assert rc == 0
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "00000.tar"), shardshuffle=False))
    assert len(samples) == 3
    if fmt != "txt":
        assert sorted(s["txt"].decode() for s in samples) == sorted(c for _, c in rows)


def test_web2clean_in_one_command_and_resume(url_list, tiny_models, tmp_path):
    root = tmp_path / "root"
    command = ["web2clean", "--config", "configs/tiny.yaml", "--url-list", str(url_list),
               "--output", str(root), "--no-progress", *DOWNLOAD, *model_overrides(tiny_models)]
    assert main(command) == 0
    clean = root / "clean"
    stats = json.loads((clean / "stats.json").read_text())
    assert stats["samples"] == 10 and stats["shards_done"] == 3
    stamps = {p: p.stat().st_mtime_ns for p in list((root / "shards").iterdir()) + list(clean.iterdir())
              if p.name.endswith(("_stats.json", ".tar"))}
    # Rerun: both stages skip what they finished.
    assert main(command) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((clean / "stats.json").read_text())["timing"]["shards_skipped"] == 3
