"""URL list -> img2dataset shards -> capfilt, against a real HTTP server on 127.0.0.1."""

import io
import json
import re
import os
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from capfilt.io.layout import LOCK_FILE
from pipelines.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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

    # Never into its input: img2dataset's NNNNN_stats.json has the name of capfilt's done marker.
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    for mode in ("incremental", "overwrite"):
        assert main(["run", "--config", "configs/tiny.yaml", "--input", str(shards), "--output", str(shards),
                     "--mode", mode, "--no-progress", *model_overrides(tiny_models)]) == 2
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before
    # An output folder that holds img2dataset's stats (here: a copy of the download) skips nothing.
    out = tmp_path / "clean"
    shutil.copytree(shards, out)
    rc = main(["run", "--config", "configs/tiny.yaml", "--input", str(shards), "--output", str(out),
               "--no-progress", *model_overrides(tiny_models)])
    assert rc == 0
    assert json.loads((out / "stats.json").read_text())["timing"]["shards_skipped"] == 0
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


def web2clean_process(command) -> None:
    """As a user runs it: a process whose exit status is checked (an abort at exit shows)."""
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", *command], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "capfilt summary" in result.stdout and "download summary" in result.stdout


def test_web2clean_in_one_command_and_resume(url_list, tiny_models, tmp_path):
    root = tmp_path / "root"
    command = ["web2clean", "--config", "configs/tiny.yaml", "--url-list", str(url_list),
               "--output", str(root), "--no-progress", *DOWNLOAD, *model_overrides(tiny_models)]
    web2clean_process(command)
    clean = root / "clean"
    stats = json.loads((clean / "stats.json").read_text())
    assert stats["samples"] == 10 and stats["shards_done"] == 3
    stamps = {p: p.stat().st_mtime_ns for p in list((root / "shards").iterdir()) + list(clean.iterdir())
              if p.name.endswith(("_stats.json", ".tar"))}
    # Rerun: both stages skip what they finished.
    web2clean_process(command)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((clean / "stats.json").read_text())["timing"]["shards_skipped"] == 3


def test_download_into_a_folder_of_another_download_is_refused_unless_overwrite(url_list, tmp_path, capsys):
    shards = tmp_path / "shards"

    def download(*extra, url_list=url_list):
        rc = main(["download", "--config", "configs/tiny.yaml", "--url-list", str(url_list),
                   "--output", str(shards), *DOWNLOAD, *extra])
        return rc, capsys.readouterr()

    assert download()[0] == 0
    def stamps_now():
        return {p.name: p.stat().st_mtime_ns for p in shards.iterdir() if p.name != LOCK_FILE}

    stamps = stamps_now()
    rc, said = download("download.image_size=32")
    assert rc == 2 and "download.image_size: 64 -> 32" in said.err and "--mode overwrite" in said.err
    fewer = tmp_path / "fewer.parquet"
    pq.write_table(pq.read_table(url_list).slice(0, 4), fewer)
    rc, said = download(url_list=fewer)
    assert rc == 2 and "download.url_list: " in said.err and "fewer.parquet" in said.err
    assert stamps_now() == stamps  # nothing touched
    # Placement is not identity: more threads resume the same download.
    assert download("download.thread_count=2")[0] == 0
    assert {n: t for n, t in stamps_now().items() if n.endswith(".tar")} == \
        {n: t for n, t in stamps.items() if n.endswith(".tar")}
    assert download("download.image_size=32", "--mode", "overwrite")[0] == 0
    sizes = [min(Image.open(io.BytesIO(s["jpg"])).size) for s in
             wds.WebDataset(str(shards / "00000.tar"), shardshuffle=False)]
    assert sizes and max(sizes) <= 32  # keep_ratio: the shorter side
    assert download("download.image_size=32")[0] == 0  # the overwrite's record: resumes


def test_a_download_where_every_url_fails_says_why(server, tmp_path, capsys):
    urls = [f"{server}/missing/{n}.jpg" for n in range(3)] + ["http://127.0.0.1:9/refused.jpg"]
    path = tmp_path / "urls.txt"
    path.write_text("".join(f"{u}\n" for u in urls))
    rc = main(["download", "--config", "configs/tiny.yaml", "--url-list", str(path),
               "--output", str(tmp_path / "shards"), *DOWNLOAD])
    said = capsys.readouterr().out
    assert rc == 1
    assert "every URL failed" in said
    assert re.search(r"3 x .*404", said) and re.search(r"1 x .*[Cc]onnection refused", said), said
