"""``capfilt run`` from and to S3: moto's server on 127.0.0.1 stands in for the object store.

The output in the bucket must equal that of a local run of the same shards and config,
and a rerun after a driver kill must redo only the unfinished shard.
"""

import collections
import copy
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest
from conftest import make_web_shards
from faults import snapshot

from pipelines.cli import main

# The test extra (make test installs it): a missing one fails the suite, it never skips.
import boto3  # noqa: E402
import moto.server  # noqa: E402, F401
import s3fs  # noqa: E402, F401

BUCKET = "capfilt-test"
SHARDS, PER_SHARD = 3, 5
NAMES = [f"{s:05d}" for s in range(SHARDS)]
INPUT = f"s3://{BUCKET}/in/{{00000..{SHARDS - 1:05d}}}.tar"
OUTPUT = f"s3://{BUCKET}/out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_answering(url: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"moto server exited with {proc.returncode}"
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto server at {url} did not answer")


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free loopback port with an empty bucket; dummy credentials in the env."""
    import fsspec.config
    import s3fs

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    saved_conf = copy.deepcopy(fsspec.config.conf)  # capfilt sets fsspec defaults in this process
    with pytest.MonkeyPatch.context() as mp:
        # Ray workers are started from this process and inherit these.
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_answering(endpoint + "/", proc)
            client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            client.create_bucket(Bucket=BUCKET)
            yield {"endpoint": endpoint, "client": client}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            fsspec.config.conf.clear()
            fsspec.config.conf.update(saved_conf)
            s3fs.S3FileSystem.clear_instance_cache()


def args(tiny_models, inputs, output, *extra):
    cap, itm = tiny_models
    return ["run", "--config", "configs/tiny.yaml", "--input", str(inputs), "--output", str(output),
            "--no-progress", f"captioner.model={cap}", f"filter.model={itm}",
            "filter.threshold=0.4633", "captioner.num_captions=3", "runtime.batch_size=2", *extra]


def storage(endpoint: str, **more: str) -> str:
    """The ``storage_options`` override, as a YAML flow mapping."""
    items = ", ".join([f'endpoint_url: "{endpoint}"'] + [f'{k}: "{v}"' for k, v in more.items()])
    return f"storage_options={{s3: {{{items}}}}}"


def keys(client, prefix: str = "out/") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", []))


def get(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def download(client, folder):
    folder.mkdir(parents=True)
    for name in keys(client):
        (folder / name).write_bytes(get(client, "out/" + name))
    return folder


def comparable(files: dict) -> dict:
    """A snapshot without run.json's storage_options, which only the S3 runs have."""
    files = copy.deepcopy(files)
    files["run.json"]["config"].pop("storage_options")
    return files


@pytest.fixture(scope="module")
def first_run(s3, tiny_models, tmp_path_factory):
    """Shards uploaded to s3://BUCKET/in/, one run to s3://BUCKET/out, and a local reference run."""
    root = tmp_path_factory.mktemp("s3")
    local_in = root / "in"
    for path in make_web_shards(local_in, shards=SHARDS, per_shard=PER_SHARD):
        with open(path, "rb") as f:
            s3["client"].put_object(Bucket=BUCKET, Key=f"in/{path.rsplit('/', 1)[1]}", Body=f.read())
    assert main(args(tiny_models, local_in, root / "reference")) == 0
    rc = main(args(tiny_models, INPUT, OUTPUT, storage(s3["endpoint"])))
    return {"rc": rc, "reference": snapshot(root / "reference")}


def test_run_reads_and_writes_s3_like_a_local_run(s3, first_run, tmp_path):
    assert first_run["rc"] == 0
    expected = {f"{n}{suffix}" for n in NAMES for suffix in (".tar", ".parquet", "_stats.json")}
    assert set(keys(s3["client"])) == expected | {"run.json", "stats.json", "sizes.json"}
    assert not [k for k in keys(s3["client"], "") if ".tmp-" in k]

    out = download(s3["client"], tmp_path / "out")
    seen = collections.Counter(k for n in NAMES for k in pq.read_table(out / f"{n}.parquet")["key"].to_pylist())
    assert seen == collections.Counter(f"{s:05d}{i:04d}" for s in range(SHARDS) for i in range(PER_SHARD))

    files = snapshot(out)
    assert files["run.json"]["config"]["storage_options"] == {"s3": {"endpoint_url": s3["endpoint"]}}
    assert comparable(files) == comparable(first_run["reference"])
    stats = json.loads((out / "00001_stats.json").read_text())
    assert stats["input"] == f"s3://{BUCKET}/in/00001.tar"


def test_rerun_after_kill_on_s3_redoes_only_the_unfinished_shard(s3, first_run, tiny_models, tmp_path):
    client = s3["client"]
    before = {n: get(client, f"out/{n}_stats.json") for n in ("00000", "00002")}
    # As if the driver died after 00001's tar and parquet but before its completion marker,
    # with a worker's temporary upload left behind.
    client.delete_object(Bucket=BUCKET, Key="out/00001_stats.json")
    client.put_object(Bucket=BUCKET, Key="out/.00001.tar.tmp-deadbeef0000", Body=b"partial")

    assert main(args(tiny_models, INPUT, OUTPUT, storage(s3["endpoint"]))) == 0

    assert not [k for k in keys(client, "") if ".tmp-" in k]
    stats = json.loads(get(client, "out/stats.json"))
    assert stats["timing"]["shards_skipped"] == 2
    assert stats["timing"]["shards_processed"] == 1
    for name, data in before.items():  # timing included: not redone
        assert get(client, f"out/{name}_stats.json") == data, name
    assert comparable(snapshot(download(client, tmp_path / "out"))) == comparable(first_run["reference"])


def test_run_json_on_s3_holds_no_credentials(s3, first_run, tiny_models):
    # Every shard is done by now, so this run only writes run.json and stats.json.
    options = storage(s3["endpoint"], key="testing", secret="sekrit")
    assert main(args(tiny_models, INPUT, OUTPUT, options)) == 0
    record = get(s3["client"], "out/run.json")
    assert b"sekrit" not in record
    assert json.loads(record)["config"]["storage_options"] == {
        "s3": {"endpoint_url": s3["endpoint"], "key": "***", "secret": "***"}}
    stats = json.loads(get(s3["client"], "out/stats.json"))
    assert stats["shards_done"] == SHARDS and stats["timing"]["shards_processed"] == 0


def test_report_reads_an_s3_output_and_its_s3_inputs(s3, first_run, tmp_path):
    """capfilt report through fsspec: stats and parquet from the output bucket, thumbnails from
    the input shards the stats name (s3://…/in/)."""
    from capfilt.report import build_report

    assert first_run["rc"] == 0
    page = tmp_path / "report.html"
    assert main(["report", OUTPUT, "--html", str(page), storage(s3["endpoint"])]) == 0
    data = build_report(OUTPUT)  # the storage options the command set are still in force
    assert data.totals["samples"] == SHARDS * PER_SHARD and data.totals["shards"] == SHARDS
    shown = [r for rows in data.examples.values() for r in rows]
    assert shown and all(r["_thumb"] for r in shown)
    assert page.read_text().count("data:image/jpeg;base64,") >= len(shown)


def test_an_s3_output_is_leased_and_a_lease_not_renewed_expires(s3, monkeypatch):
    """An object store has no OS lock: the run holds a lease it renews. A second run is refused
    while the holder renews it, and gets it once the holder is gone (released, or SIGKILLed:
    then its lease is left unrenewed, which the written lease below stands for)."""
    from capfilt.io import lock
    from capfilt.io.fs import OutputDir, configure_storage
    from capfilt.io.layout import LOCK_FILE

    configure_storage({"s3": {"endpoint_url": s3["endpoint"]}})
    monkeypatch.setattr(lock, "LEASE_SETTLE_SECONDS", 0.2)
    out, lease = OutputDir(f"s3://{BUCKET}/leased"), 1.5

    def hold_briefly():
        with lock.hold(out, "capfilt run", lease_seconds=lease):
            pass

    with lock.hold(out, "capfilt run", lease_seconds=lease):
        time.sleep(2 * lease)  # beyond one lease: only the holder's renewals keep it
        with pytest.raises(lock.OutputLocked, match=r"in use by another run \(capfilt run on host .+, "
                                                    r"pid \d+, started 20"):
            hold_briefly()
    hold_briefly()  # released at the end: the next run holds it at once
    killed = {"host": "gone", "pid": 4242, "command": "capfilt run", "started_at": "2026-01-01T00:00:00",
              "token": "theirs", "expires_at": time.time() + lease}
    out.write_bytes(LOCK_FILE, json.dumps(killed).encode())
    with pytest.raises(lock.OutputLocked, match="host gone, pid 4242"):
        hold_briefly()
    time.sleep(lease)
    hold_briefly()
    assert not out.exists(LOCK_FILE)
