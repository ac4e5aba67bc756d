"""Every gs:// path through a real GCS API: a bucket served by gcp-storage-emulator (GCS's JSON
API, started here, its objects in a folder), reached as a pod reaches GCS: the run's records
through etils and gcsfs, its orbax checkpoints through TensorStore. A local folder stays a
supported bucket (tests/test_remote_records.py); this is the path `gs://` really takes.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading

import numpy as np
import pytest
from test_remote_records import bucket_config
from test_shards import write_texts

from launch import checkpoints, data, make_shards, remote_records, shards
from launch.cli import main
from launch.train import train_and_evaluate
from scaling.errors import UserError
from scaling.store import Store

emulator = pytest.importorskip("gcp_storage_emulator.server", reason="pip install -e '.[test]'")
gcsfs = pytest.importorskip("gcsfs", reason="pip install -e '.[test]'")

BUCKET = "scaling-test"


def _send_generations(download):
    """GCS sends an object's generation with its bytes (x-goog-generation); the emulator
    does not. TensorStore then takes generation 0 for an OCDBT manifest it read back, and
    refuses its next conditional write of that manifest ("Malformed StorageGeneration"),
    which failed a checkpoint save now and then, whenever the manifest was re-read."""

    def with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]

    return with_generation


_download = emulator.objects.download
emulator.objects.download = _send_generations(_download)  # what objects.get calls for alt=media
for _, methods in emulator.HANDLERS:
    for method, handler in methods.items():
        if handler is _download:
            methods[method] = emulator.objects.download


class Emulator:
    """The emulator on a fixed port over a fixed folder: stopped and started again, it
    serves the same objects at the same address, as GCS does after an outage."""

    def __init__(self, folder):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder, self.url, self.server = str(folder), f"http://127.0.0.1:{self.port}", None

    def start(self):
        if self.server is not None:
            return  # already serving
        self.server = emulator.create_server(
            "127.0.0.1", self.port, default_bucket=BUCKET, data_dir=self.folder
        )
        # The emulator's own start() waits forever when its thread cannot bind the port.
        starting = threading.Thread(target=self.server.start, daemon=True)
        starting.start()
        starting.join(timeout=30)
        if starting.is_alive():
            raise RuntimeError(f"the GCS emulator did not start on port {self.port}")

    def stop(self):
        self.server.stop()
        self.server = None

    def fs(self):
        return gcsfs.GCSFileSystem(token="anon", endpoint_url=self.url)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    server = Emulator(tmp_path_factory.mktemp("gcs-objects"))
    server.start()
    names = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update({name: server.url for name in names})  # gcsfs's and TensorStore's
    try:
        yield server
    finally:
        server.stop()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _config(tmp, data_cache, bucket: str):
    return bucket_config(tmp, data_cache, bucket, "gcs-sweep")


@pytest.fixture(scope="module")
def trained(gcs, tmp_path_factory, data_cache):
    """A tiny run trained with its bucket on the emulator, as process 0 on a pod would."""
    tmp = tmp_path_factory.mktemp("gcs-run")
    config = _config(tmp, data_cache, f"gs://{BUCKET}/{tmp.name}")
    return config, train_and_evaluate(config)


def _evals(path, run_id):
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT step, name, value FROM metrics WHERE run_id = ? ORDER BY step, name",
            (run_id,),
        ).fetchall()


@pytest.mark.slow  # its fixture trains a run through the emulator
def test_records_and_checkpoints_go_through_the_gcs_api(gcs, trained, tmp_path, capsys):
    config, run_id = trained
    prefix = f"{config.launch.bucket.removeprefix('gs://')}/runs/{run_id}"
    objects = gcs.fs().find(prefix)
    names = {o.removeprefix(prefix + "/") for o in objects}
    assert "records/run.json" in names and sum(n.startswith("records/eval/") for n in names) == 4
    assert any(n.startswith("records/environment/") for n in names)
    steps = {n.split("/")[1] for n in names if n.startswith("checkpoints/")}
    assert steps == {"10", "20"}
    assert f"checkpoints/20/{'commit_success.txt'}" in names

    # `scaling status` reads the bucket; `scaling sync` brings it into a laptop's store, once.
    assert main(["status", "--bucket", config.launch.bucket, "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["run_id"] == run_id and row["status"] == "finished" and row["step"] == 20
    laptop = tmp_path / "laptop.sqlite"
    for _ in range(2):
        sync = ["sync", config.sweep_name, "--bucket", config.launch.bucket, "--store", str(laptop)]
        assert main(sync) == 0
    assert "synced 1 runs (4 evals)" in capsys.readouterr().out
    assert _evals(laptop, run_id) == _evals(config.store, run_id)
    with Store(laptop) as mine:
        assert mine.run(run_id).status == "finished" and len(mine.environments(run_id)) == 1


def test_a_second_listing_in_one_process_sees_the_runs_written_since(gcs, tmp_path):
    # gcsfs caches folder listings for the life of the process: a notebook's second
    # `scaling sync` listed runs/ as it was at the first, without the runs that other
    # machines had written since.
    bucket = f"gs://{BUCKET}/{tmp_path.name}"
    remote_records.RunRecords(bucket, "first").start({"run_id": "first"})
    assert remote_records.run_ids(bucket) == ["first"]
    another_machine = gcs.fs()
    another_machine.pipe(f"{BUCKET}/{tmp_path.name}/runs/second/records/run.json", b"{}")
    assert remote_records.run_ids(bucket) == ["first", "second"]


def test_a_fresh_worker_finds_the_run_finished_in_the_gcs_bucket(trained, tmp_path):
    config, run_id = trained
    config = config.copy_and_resolve_references()
    config.store = str(tmp_path / "fresh-worker.sqlite")
    before = remote_records.read_run(config.launch.bucket, run_id)
    assert train_and_evaluate(config) == run_id
    after = remote_records.read_run(config.launch.bucket, run_id)
    assert after["evals"] == before["evals"] and after["status"] == before["status"]


@pytest.mark.slow  # trains twice more
def test_a_damaged_latest_checkpoint_in_gcs_is_set_aside_and_the_run_resumes(
    gcs, tmp_path, data_cache, capsys
):
    """The latest save's largest array file lost its second half: the next slice moves the
    step aside in the bucket, resumes from the one before and ends as an uninterrupted run.
    (A step without its commit marker is one orbax never finished: in a bucket it does not
    list it, so the run resumes from the one before without setting anything aside.)"""
    config = _config(tmp_path / "a", data_cache, f"gs://{BUCKET}/{tmp_path.name}-a")
    run_id = train_and_evaluate(config.copy_and_resolve_references())
    fs = gcs.fs()
    run = f"{BUCKET}/{tmp_path.name}-a/runs/{run_id}"
    arrays = [p for p in fs.find(f"{run}/checkpoints/20") if "ocdbt" in p and "/d/" in p]
    biggest = max(arrays, key=fs.size)
    fs.pipe(biggest, fs.cat(biggest)[: fs.size(biggest) // 2])
    for status in sorted(fs.ls(f"{run}/records/status"))[1:]:
        fs.rm(status)  # the "finished" record was never written
    config.store = str(tmp_path / "second-slice.sqlite")
    capsys.readouterr()
    train_and_evaluate(config)
    err = capsys.readouterr().err
    assert "checkpoint at step 20" in err and "damaged" in err and "previous one" in err
    assert [p.split("/")[-1].split("-")[0] for p in fs.ls(f"{run}/damaged_checkpoints")] == ["20"]
    assert {p.split("/")[-1] for p in fs.ls(f"{run}/checkpoints")} >= {"10", "20"}

    clean = _config(tmp_path / "b", data_cache, f"gs://{BUCKET}/{tmp_path.name}-b")
    train_and_evaluate(clean)
    resumed, reference = _evals(config.store, run_id), _evals(clean.store, run_id)
    resumed = {(s, n): v for s, n, v in resumed if s > 10 and n == "eval_loss"}
    reference = {(s, n): v for s, n, v in reference if s > 10 and n == "eval_loss"}
    assert resumed.keys() == reference.keys() and resumed
    for key, value in reference.items():
        assert resumed[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


@pytest.mark.slow  # gcsfs retries a dead endpoint for about half a minute
def test_gcs_gone_mid_sync_skips_what_it_could_not_read_and_a_retry_brings_it_once(
    gcs, trained, tmp_path, capsys, monkeypatch
):
    config, run_id = trained
    fs = gcs.fs()
    bucket = config.launch.bucket.removeprefix("gs://")
    twin = "0" * 12  # a second run: the first one's records under another id
    for source in fs.find(f"{bucket}/runs/{run_id}/records"):
        target = source.replace(f"/runs/{run_id}/", f"/runs/{twin}/")
        data = fs.cat(source)
        if source.endswith("run.json"):
            data = json.dumps({**json.loads(data), "run_id": twin}).encode()
        fs.pipe(target, data)
    read_run, reads = remote_records.read_run, []

    def read_then_fail(bucket, run):  # GCS goes away after the first run is read
        reads.append(run)
        if len(reads) == 2:
            gcs.stop()
        return read_run(bucket, run)

    monkeypatch.setattr(remote_records, "read_run", read_then_fail)
    laptop = tmp_path / "laptop.sqlite"
    sync = ["sync", config.sweep_name, "--bucket", config.launch.bucket, "--store", str(laptop)]
    try:
        assert main(sync) == 1  # one run synced, the other skipped with its reason
    finally:
        gcs.start()
    out, err = capsys.readouterr()
    # (The emulator, in this process, prints its own broken connections to stderr too.)
    said = [line for line in err.splitlines() if line.startswith("skipped ")]
    assert "synced 1 runs" in out and len(said) == 1 and "ClientConnectorError" in said[0], err
    monkeypatch.undo()
    assert main(sync) == 0
    with Store(laptop) as mine:
        assert sorted(r.run_id for r in mine.runs()) == sorted([run_id, twin])
    for run in (run_id, twin):
        assert _evals(laptop, run) == _evals(config.store, run_id)  # each once, none lost


@pytest.fixture(scope="module")
def bucket_corpus(gcs, tmp_path_factory):
    """A corpus prepared into the bucket by two worker processes, and the same prepared into a
    local folder: (bucket path, local path, manifest)."""
    tmp = tmp_path_factory.mktemp("bucket-corpus")
    texts = write_texts(tmp / "text")
    options = {"val_fraction": 0.25, "shard_mb": 0.008, "progress": False}
    bucket = f"gs://{BUCKET}/{tmp.name}/corpus"
    manifest = make_shards.prepare(texts, "bpe:300", bucket, workers=2, **options)
    local = make_shards.prepare(texts, "bpe:300", str(tmp / "local"), workers=1, **options)
    assert manifest["fingerprint"] == local["fingerprint"]
    return bucket, str(tmp / "local"), manifest


def _manifest_config(manifest: str, cache):
    cfg = data.default_data_config()
    cfg.manifest, cfg.cache_dir = manifest, str(cache)
    # The emulator serves one request at a time from a listen queue of 5; a sixth in flight
    # waits a second for TCP to try again (GCS itself serves many at once).
    cfg.read_threads = 4
    return cfg


def test_a_corpus_prepared_into_the_bucket_is_checked_from_gcs_and_read_by_ranges(
    gcs, bucket_corpus, tmp_path
):
    """Shards checked from GCS's own MD5s and read by ranged requests: the batches are those of
    the same corpus prepared locally, read ahead or not; a changed or missing object is
    refused in one line."""
    bucket, local, manifest = bucket_corpus
    fs = gcs.fs()
    names = {p.split("/")[-1] for p in fs.ls(bucket.removeprefix("gs://"))}
    expected = {s["file"] for split in shards.SPLITS for s in manifest["splits"][split]["shards"]}
    assert names == expected | {shards.MANIFEST, shards.TOKENIZER}
    remote = data.prepare_corpus(_manifest_config(bucket, tmp_path), 300, progress=False)
    mine = data.prepare_corpus(_manifest_config(local, tmp_path), 300, progress=False)
    assert remote.train.remote and not mine.train.remote
    for step in (0, 5, 500):
        np.testing.assert_array_equal(
            data.train_batch(remote.train, step, 8, 32, 0, 1, 2),
            data.train_batch(mine.train, step, 8, 32, 0, 1, 2),
        )
    read_ahead = data.train_batches(remote.train, 8, 32, 0)
    for step in (0, 1, 2, 7):  # read ahead, then a jump (a resume) past what was read ahead
        np.testing.assert_array_equal(
            read_ahead(step), data.train_batch(mine.train, step, 8, 32, 0)
        )

    # A copy of the corpus whose shards are then changed or removed.
    copy = f"{bucket}-copy"
    fs.copy(bucket.removeprefix("gs://"), copy.removeprefix("gs://"), recursive=True)
    shard = f"{copy.removeprefix('gs://')}/{manifest['splits']['train']['shards'][0]['file']}"
    raw = bytearray(fs.cat(shard))
    raw[-1] ^= 1
    fs.pipe(shard, bytes(raw))  # same size, another MD5 in the object's metadata
    with pytest.raises(UserError, match="fails its checksum"):
        data.prepare_corpus(_manifest_config(copy, tmp_path), 300, progress=False)
    fs.rm(shard)
    with pytest.raises(UserError, match="is missing"):
        data.prepare_corpus(_manifest_config(copy, tmp_path), 300, progress=False)


@pytest.mark.slow  # trains a run
def test_a_run_trains_from_a_corpus_in_the_bucket(bucket_corpus, tiny_config):
    tiny_config.data.manifest = bucket_corpus[0]
    tiny_config.data.read_threads = 4  # see _manifest_config
    tiny_config.model.vocab_size = 300
    run_id = train_and_evaluate(tiny_config)
    with Store(tiny_config.store) as store:
        assert store.run(run_id).status == "finished"
        steps, losses = store.scalars(run_id, "eval_loss")
    assert steps[-1] == 20 and losses[-1] < losses[0]


@pytest.mark.slow  # trains twice, with a few seconds of outage
def test_gcs_gone_for_seconds_mid_save_the_run_goes_on_and_loses_nothing(
    gcs, tmp_path, data_cache, monkeypatch
):
    """GCS stops just as the step-10 checkpoint starts saving and comes back 3 s later: the
    clients' retries carry the save and the records through, and the run ends exactly as an
    uninterrupted one, each eval stored once."""
    config = _config(tmp_path / "a", data_cache, f"gs://{BUCKET}/{tmp_path.name}-a")
    real_save = checkpoints.Checkpointer.save
    outages = []

    def save_through_an_outage(self, step, *args, **kwargs):
        if step == 10 and not outages:
            gcs.stop()
            outages.append(threading.Timer(3.0, gcs.start))
            outages[0].start()
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoints.Checkpointer, "save", save_through_an_outage)
    run_id = train_and_evaluate(config.copy_and_resolve_references())
    outages[0].join()
    fs = gcs.fs()
    run = f"{BUCKET}/{tmp_path.name}-a/runs/{run_id}"
    assert {p.split("/")[-1] for p in fs.ls(f"{run}/checkpoints")} >= {"10", "20"}
    monkeypatch.undo()
    clean = _config(tmp_path / "b", data_cache, f"gs://{BUCKET}/{tmp_path.name}-b")
    train_and_evaluate(clean)

    def losses(evals):  # what the run learned (timings such as mfu differ run to run)
        return [(step, value) for step, name, value in evals if name == "eval_loss"]

    assert losses(_evals(config.store, run_id)) == losses(_evals(clean.store, run_id))
    assert len(losses(_evals(config.store, run_id))) == 4  # each eval once
    recorded = remote_records.read_run(config.launch.bucket, run_id)
    steps = [step for step, _ in losses(_evals(clean.store, run_id))]
    assert [e["step"] for e in recorded["evals"]] == steps
    assert recorded["status"]["status"] == "finished"
