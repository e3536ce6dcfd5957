"""The ``capfilt`` command line as a user meets it: real processes, their exit codes and stderr.

A bad config or input exits 2 with one line naming the problem and no traceback; Ctrl-C exits
130 with one line, leaves no temporary, and a rerun finishes the job.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from conftest import COLOURS, image_bytes, make_web_shards, write_shard

from capfilt.io.layout import STATS_FILE, is_temporary, shard_of_stats
from pipelines.cli import build_parser, parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY_STARTED = re.compile(r"INFO worker\.py:\d+ -- Started a local Ray instance")


def capfilt(*argv, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("capfilt: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(params=["read_only_folder", "under_a_file"])
def unwritable(request, tmp_path):
    """A folder nothing can be written into. chmod does not stop root: then the read-only case
    is skipped, and a path under a regular file (which stops everyone) still runs."""
    if request.param == "under_a_file":
        (tmp_path / "a_file").write_text("")
        return tmp_path / "a_file" / "out"
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    request.addfinalizer(lambda: folder.chmod(0o700))
    try:
        (folder / "probe").mkdir()
    except PermissionError:
        return folder
    pytest.skip("this user writes into a chmod 0o500 folder anyway (root)")


def tiny_run(tiny_models, inputs, output, *extra):
    cap, itm = tiny_models
    return ["run", "--config", "configs/tiny.yaml", "--input", inputs, "--output", output,
            f"captioner.model={cap}", f"filter.model={itm}", "runtime.batch_size=4", *extra]


def test_unwritable_output_is_one_line(tiny_models, tmp_path, unwritable):
    make_web_shards(tmp_path / "web", shards=1, per_shard=2)
    result = capfilt(*tiny_run(tiny_models, tmp_path / "web", unwritable, "--no-progress"))
    assert_one_line_error(result, str(unwritable))


def test_tiny_models_into_an_unwritable_folder_is_one_line(unwritable):
    assert_one_line_error(capfilt("tiny-models", unwritable), str(unwritable))


def test_an_empty_model_folder_is_refused_before_ray_starts(tiny_models, tmp_path):
    make_web_shards(tmp_path / "web", shards=1, per_shard=2)
    (tmp_path / "empty").mkdir()
    result = capfilt(*tiny_run(tiny_models, tmp_path / "web", tmp_path / "out", "--no-progress",
                               f"captioner.model={tmp_path / 'empty'}"))
    assert_one_line_error(result, "captioner.model", "holds no checkpoint")


def missing_weights(checkpoint, folder):
    """A copy of ``checkpoint`` with its text model's last layer left out of the safetensors."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(checkpoint, folder)
    tensors = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".layer.1." not in k}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("case", ["filter_as_captioner", "weights_missing"])
def test_a_checkpoint_that_does_not_load_whole_is_refused_before_ray_starts(tiny_models, tmp_path, case):
    make_web_shards(tmp_path / "web", shards=1, per_shard=2)
    if case == "filter_as_captioner":
        model, words = tiny_models[1], ["is a BlipForImageTextRetrieval checkpoint", "BlipForConditionalGeneration"]
    else:
        model = missing_weights(tiny_models[0], tmp_path / "cut")
        words = ["does not load whole as BlipForConditionalGeneration", "weights missing (text_decoder: "]
    result = capfilt(*tiny_run(tiny_models, tmp_path / "web", tmp_path / "out", "--no-progress",
                               f"captioner.model={model}"))
    assert_one_line_error(result, "captioner.model", str(model), *words)


def test_a_filter_tokenizer_without_enc_is_refused_before_ray_starts(tiny_models, tmp_path):
    from test_models import without_enc

    make_web_shards(tmp_path / "web", shards=1, per_shard=2)
    folder = without_enc(tiny_models[1], tmp_path)
    result = capfilt(*tiny_run(tiny_models, tmp_path / "web", tmp_path / "out", "--no-progress",
                               f"filter.model={folder}"))
    assert_one_line_error(result, "filter.model", folder, "has no [ENC] token", "filter.first_token: cls")


@pytest.mark.parametrize("override, key", [("captioner.max_length=200", "captioner.max_length"),
                                           ("filter.max_text_tokens=100", "filter.max_text_tokens")])
def test_a_text_length_beyond_the_models_positions_is_refused_before_ray_starts(
        tiny_models, tmp_path, override, key):
    """It used to fail every shard twice with 'IndexError: index out of range in self'."""
    make_web_shards(tmp_path / "web", shards=1, per_shard=2)
    result = capfilt(*tiny_run(tiny_models, tmp_path / "web", tmp_path / "out", "--no-progress", override))
    assert_one_line_error(result, key, "has 64 positions")
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_default_is_refused_before_ray_starts(tmp_path):
    make_web_shards(tmp_path / "web", shards=1, per_shard=2)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))  # an empty cache
    result = capfilt("run", "--input", tmp_path / "web", "--output", tmp_path / "out", env=env)
    assert_one_line_error(result, "captioner.model", "Salesforce/", "HF_HUB_OFFLINE")
    assert not (tmp_path / "out").exists()


def test_inspect_with_a_negative_limit_is_one_line(tmp_path):
    make_web_shards(tmp_path / "web", shards=1, per_shard=2)
    assert_one_line_error(capfilt("inspect", tmp_path / "web" / "00000.tar", "--limit", "-1"), "--limit")


def test_reading_subcommands_exit_0_as_processes(tmp_path):
    """inspect read parquet through a Python file object, and pyarrow 26 then aborted at exit
    now and then (exit 134, 'terminate called without an active exception'): only a process
    shows it, so each reading subcommand runs as one, inspect several times."""
    from test_io import shard_samples, write_output

    out = tmp_path / "out"
    write_output(out, shard_samples())
    script = os.path.join(os.path.dirname(sys.executable), "capfilt")  # as users run it; aborted most
    for _ in range(3):
        for target in (out, out / "00000.parquet"):
            result = subprocess.run([script, "inspect", str(target)], capture_output=True, text=True, timeout=60)
            assert result.returncode == 0 and "000" in result.stdout, (result.returncode, result.stderr)
    report = capfilt("report", out, "--html", tmp_path / "r.html")
    assert report.returncode == 0 and (tmp_path / "r.html").stat().st_size > 0, report.stderr
    reshard = capfilt("reshard", out, tmp_path / "packed", "--samples-per-shard", "1", "--no-progress")
    assert reshard.returncode == 0 and (tmp_path / "packed" / "00001.tar").exists(), reshard.stderr


def test_calibrate_exits_0_as_a_process(tiny_models, tmp_path):
    from test_inspect_calibrate import labelled_shard

    result = capfilt("calibrate", "--config", "configs/tiny.yaml", "--labelled", labelled_shard(tmp_path / "l.tar"),
                     f"filter.model={tiny_models[1]}", "--target", "precision", "--value", "0.5")
    assert result.returncode == 0 and "suggested filter.threshold=" in result.stdout, result.stderr
    assert "Traceback" not in result.stderr


# --- download: the URL list is checked before img2dataset starts ------------------------------------

def test_download_of_a_list_without_the_caption_column_is_one_line(tmp_path):
    (tmp_path / "urls.csv").write_text("url,text\nhttp://127.0.0.1:9/a.jpg,a red square\n")
    result = capfilt("download", "--url-list", tmp_path / "urls.csv", "--output", tmp_path / "out")
    assert_one_line_error(result, "download.caption_col", "'caption'", "url, text")
    assert not (tmp_path / "out").exists()  # no _tmp/ left behind


def test_download_of_a_missing_list_is_one_line(tmp_path):
    result = capfilt("download", "--url-list", tmp_path / "nope.parquet", "--output", tmp_path / "out")
    assert_one_line_error(result, "download.url_list", "nope.parquet")
    assert not (tmp_path / "out").exists()


# --- finetune ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    names = list(COLOURS)
    write_shard(folder / "00000.tar", [{"key": f"{i:04d}", "jpg": image_bytes(names[i % 4], seed=i),
                                        "txt": f"a {names[i % 4]} square"} for i in range(16)])
    return folder


def finetune(pairs, output, init):
    base = "finetune.filter"
    return capfilt("finetune", "filter", "--no-progress", f"{base}.train={pairs}", f"{base}.output={output}",
                   f"{base}.init={init}", f"{base}.image_size=64", f"{base}.batch_size=8",
                   f"{base}.max_steps=1", f"{base}.epochs=1")


def test_finetune_from_a_missing_init_is_one_line(pairs, tmp_path):
    assert_one_line_error(finetune(pairs, tmp_path / "out", tmp_path / "nope"), "finetune.filter.init", "nope")


def test_finetune_from_a_checkpoint_that_does_not_load_whole_is_one_line(pairs, tiny_models, tmp_path):
    cut = missing_weights(tiny_models[1], tmp_path / "cut")
    assert_one_line_error(finetune(pairs, tmp_path / "out", cut), "finetune.filter.init", str(cut),
                          "does not load whole as BlipForImageTextRetrieval", "weights missing")


def test_finetune_rerun_with_another_init_is_one_line(pairs, tiny_models, tmp_path):
    from capfilt.models.tiny import build_tiny_models

    first = finetune(pairs, tmp_path / "out", tiny_models[0])
    assert first.returncode == 0, first.stderr
    # The documented partial start says what it reuses and what starts fresh.
    said = re.search(r"is a captioner checkpoint: the filter reuses (.*) \(the text .* and starts (.*) fresh",
                     first.stderr)
    assert said and "vision_model: " in said[1] and "text_encoder: " in said[1], first.stderr
    assert "itm_head: 2" in said[2] and "text_encoder" not in said[2], first.stderr
    other, _ = build_tiny_models(str(tmp_path / "narrow"), hidden=32)
    assert_one_line_error(finetune(pairs, tmp_path / "out", other), str(tmp_path / "out"), "another shape")


# --- Ctrl-C -----------------------------------------------------------------------------------------

def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line or environment holds ``text`` (Linux's /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for part in ("cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{part}", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(pid))
                        break
            except OSError:
                pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="looks for leftover Ray processes in /proc")
def test_ctrl_c_stops_with_one_line_and_a_rerun_finishes(tiny_models, tmp_path):
    make_web_shards(tmp_path / "web", shards=6, per_shard=8)
    out = tmp_path / "out"
    ray_tmp = tempfile.mkdtemp(prefix="capfilt-ctrl-c-", dir="/tmp")  # short: Ray's socket paths
    env = dict(os.environ, RAY_TMPDIR=ray_tmp)
    argv = [sys.executable, "-m", "pipelines.cli", *map(str, tiny_run(tiny_models, tmp_path / "web", out))]
    # A child inherits an ignored SIGINT (as an earlier test in this process may leave it), and
    # Python then never raises KeyboardInterrupt: give the run the default, as a terminal does.
    process = subprocess.Popen([*argv, "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    # A shard's tar being written (not run.json's temporary, written before Ray starts).
    while not (out.is_dir() and any((is_temporary(n) and ".tar" in n) or shard_of_stats(n)
                                    for n in os.listdir(out))):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)  # until a shard is under way
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)

    assert process.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not RAY_STARTED.search(line)]
    assert len(lines) == 1 and re.match(r"capfilt: interrupted; \d of 6 shards done in .*rerun", lines[0]), err
    assert not [n for n in os.listdir(out) if is_temporary(n)]
    assert not (out / STATS_FILE).exists()  # it was stopped before the end
    time.sleep(2)
    assert processes_mentioning(ray_tmp) == []

    rerun = subprocess.run([*argv, "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / STATS_FILE).read_text())["shards_done"] == 6


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("where, mode", [("the_input", "overwrite"), ("inside_the_input", "incremental")])
def test_an_output_in_an_input_folder_is_refused_and_the_input_untouched(tiny_models, tmp_path, where, mode):
    web = tmp_path / "web"
    make_web_shards(web, shards=2, per_shard=2)
    (web / "00000_stats.json").write_text('{"count": 2, "successes": 2}')  # as img2dataset writes
    before = folder_bytes(web)
    output = web if where == "the_input" else web / "clean"
    result = capfilt(*tiny_run(tiny_models, web, output, "--no-progress", "--mode", mode))
    assert_one_line_error(result, f"output {output} is", str(web), "another output folder")
    assert folder_bytes(web) == before


def test_a_second_run_into_the_same_output_is_refused_and_a_killed_run_blocks_nothing(tiny_models, tmp_path):
    make_web_shards(tmp_path / "web", shards=6, per_shard=8)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "pipelines.cli", *map(str, tiny_run(tiny_models, tmp_path / "web", out)),
            "--no-progress"]
    first = subprocess.Popen(argv, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (out / "run.json").exists():  # written while the run holds the folder
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert_one_line_error(second, str(out), "in use by another run", f"pid {first.pid}", "started 20")
        assert first.poll() is None, "the first run ended before the second was refused"
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # the Ray processes it had started
    third = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr
    assert json.loads((out / STATS_FILE).read_text())["shards_done"] == 6


def test_the_bar_is_drawn_rarely_when_stderr_is_not_a_terminal(capsys):
    """A log file would otherwise get a line of carriage returns, ten a second."""
    from capfilt.runtime.progress import SampleBar

    bar = SampleBar(total=100, shards=1)
    for samples in range(1, 6):
        time.sleep(0.15)  # more than tqdm's 0.1 s between draws on a terminal
        bar.update({"samples": samples, "kept": samples})
    bar.close()
    assert capsys.readouterr().err.count("\r") <= 2  # the first draw and the last


# --- the parser -------------------------------------------------------------------------------------

def test_overrides_are_taken_from_anywhere_on_the_line():
    args = parse(["run", "--input", "a.tar", "b.tar", "filter.threshold=0.3", "--output", "o",
                  "runtime.batch_size=2"])
    assert args.input == ["a.tar", "b.tar"] and args.output == "o"
    assert args.overrides == ["filter.threshold=0.3", "runtime.batch_size=2"]
    with pytest.raises(SystemExit) as info:
        parse(["inspect", "x.tar", "filter.threshold=0.3"])
    assert info.value.code == 2


def test_every_option_says_what_it_does_and_its_default():
    parser = build_parser()
    assert "``" not in parser.format_help()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, command in commands.items():
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if action.dest == "help":
                continue
            assert action.help, f"capfilt {name} {action.dest}: no help"
            shown = action.default not in (None, False, []) and not isinstance(action.default, bool)
            if shown:
                assert f"(default: {action.default})" in text, f"capfilt {name} {action.dest}: no default"


# --- credentials ----------------------------------------------------------------------------------

USER_PASSWORD, SIGNATURE = "hunter2pw", "SIGSECRET123"


@pytest.fixture
def signed_shards(tmp_path):
    """Shards served on 127.0.0.1, named by URLs that carry a password and a signature."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    make_web_shards(tmp_path / "served", shards=1, per_shard=3)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://capuser:{USER_PASSWORD}@127.0.0.1:{httpd.server_port}"
    yield [f"{base}/{name}.tar?X-Amz-Signature={SIGNATURE}&X-Amz-Date=20261202" for name in ("00000", "gone")]
    httpd.shutdown()


def test_credentials_in_input_urls_reach_no_file_and_no_output(tiny_models, tmp_path, signed_shards):
    # One run of two signed URLs, one of them gone: what is written of a done shard and what is
    # printed of a failed one both pass through the redaction.
    out = tmp_path / "out"
    env = dict(os.environ, NO_PROXY="localhost,127.0.0.1,::1")
    argv = tiny_run(tiny_models, signed_shards[0], out, "--no-progress", "-v", "runtime.shard_attempts=1",
                    f"storage_options={{http: {{headers: {{X-Api-Key: {SIGNATURE}}}}}}}")
    argv.insert(argv.index(signed_shards[0]) + 1, signed_shards[1])  # --input takes both
    result = capfilt(*argv, env=env)
    assert result.returncode == 1, result.stderr  # the 404 is named, masked
    assert "gone" in result.stdout
    assert json.loads((out / STATS_FILE).read_text())["shards_done"] == 1
    written = [p.read_bytes() for p in out.iterdir()]
    for secret in (USER_PASSWORD, SIGNATURE):
        assert not any(secret.encode() in data for data in written), secret
        assert secret not in result.stdout + result.stderr, secret
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "00000.parquet", "00000.tar", "00000_stats.json", "run.json", "sizes.json", "stats.json"]
