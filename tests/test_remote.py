"""Shards streamed from real servers on 127.0.0.1 (nginx over HTTP, moto's S3 endpoint): the
same samples in the same order as the folder, trainings bitwise equal, exactly-once evaluation,
and the faults (403, 404, a server gone mid-epoch, a truncated or corrupted shard)."""

from __future__ import annotations

import json
import shutil
import signal
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seg.analysis.comparability import shards_identity
from seg.data import remote
from seg.data.loader import EvalStream, TrainStream, eval_loader, shard_samples, shards_of
from seg.data.manifest import ManifestError, fold_groups, load_manifest, verify
from seg.data.remote import RemoteError, Store
from seg.data.transforms import TrainGeometry
from seg.train import main as train_main
from tests.servers import MotoS3, Nginx, Stalled, nginx_missing_reason
from tests.tiny_training import FOLD, REPO, run, steps_logged, tiny_shards
from tools import pack_cityscapes

SHARD_SIZE = 12_000  # several shards per group: a server can go away between two of them
EPOCHS = "train.epochs=2"


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    return tiny_shards(tmp_path_factory.mktemp("remote"), shard_size=SHARD_SIZE)


@pytest.fixture(scope="module")
def served(packed, tmp_path_factory):
    """nginx serving a copy of the packed folder at /shards (and /denied/shards, refused)."""
    if reason := nginx_missing_reason():
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(packed, root / "shards")
    shutil.copytree(packed, root / "denied" / "shards")
    server = Nginx(root, tmp_path_factory.mktemp("nginx"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def faulty(packed, served, tmp_path_factory):
    """A copy of the packed folder of this test's own, served at /faulty-N: the test breaks it."""
    name = tmp_path_factory.mktemp("faulty").name
    shutil.copytree(packed, served.root / name)
    yield served.root / name, f"{served.url}/{name}"
    if served.process is None:  # a test that stopped it leaves it running for the next
        served.start()


@pytest.fixture(scope="module")
def s3(packed):
    server = MotoS3()
    server.upload(packed, "seg-data", "cityscapes")
    with pytest.MonkeyPatch.context() as env:
        for key, value in server.env.items():
            env.setenv(key, value)
        env.delenv("AWS_PROFILE", raising=False)
        remote._S3_CLIENTS.clear()  # a client made before these variables would keep its endpoint
        yield server
        remote._S3_CLIENTS.clear()
    server.stop()


@pytest.fixture
def stalled():
    server = Stalled()
    yield server
    server.stop()


def items(stream) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    return [(i["key"], i["image"], i.get("label")) for i in stream]


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        x[0] == y[0] and torch.equal(x[1], y[1]) and (x[2] is None or torch.equal(x[2], y[2]))
        for x, y in zip(a, b, strict=True)
    )


# --- the same samples in the same order ------------------------------------------------------


def test_a_train_stream_from_http_and_s3_equals_the_folders_per_seed_epoch_and_rank(packed, served, s3):
    groups, _ = fold_groups(load_manifest(packed), 0)
    geometry = TrainGeometry(mode="resize", size=(32, 64), level="standard")
    for location in (f"{served.url}/shards", "s3://seg-data/cityscapes/"):
        shards = shards_of(location, groups)
        assert len(shards) > 1 and shards[0].path.startswith(location.rstrip("/"))
        for rank, epoch in ((0, 0), (1, 3)):
            local = TrainStream(shards_of(packed, groups), geometry, 6, seed=5, rank=rank).epoch(epoch)
            streamed = TrainStream(shards, geometry, 6, seed=5, rank=rank).epoch(epoch)
            assert same(items(streamed), items(local)), (location, rank, epoch)


def test_evaluation_from_http_sees_every_sample_once_across_ranks_in_the_folders_order(packed, served):
    groups = ["val", "train-fold1"]
    local = items(EvalStream(shards_of(packed, groups)))
    for world in (2, 3):
        streamed = []
        for rank in range(world):
            loader, total = eval_loader(f"{served.url}/shards", groups, rank=rank, world_size=world, workers=0)
            streamed += [(k, i[0], label[0]) for batch in loader for k, i, label in
                         [(batch["key"][0], batch["image"], batch["label"])]]  # fmt: skip
        assert total == len(local) and same(streamed, local), world


# --- trainings: bitwise equal to the folder's -------------------------------------------------


def assert_same_training(out: Path, local: Path) -> None:
    whole, again = load_file(local / "model.safetensors"), load_file(out / "model.safetensors")
    assert whole.keys() == again.keys() and all(torch.equal(again[k], t) for k, t in whole.items())

    def measured(folder: Path) -> list[dict]:  # losses and evaluations, not timings
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        results = ("fold/", "train/loss")
        kept = [{k: v for k, v in r.items() if k == "step" or k.startswith(results)} for r in records]
        return [{k: v for k, v in r.items() if k != "fold/seconds"} for r in kept]

    evaluations = [r for r in measured(local) if "fold/miou" in r]
    assert len(evaluations) == 2 and measured(out) == measured(local)


@pytest.mark.timeout(900)  # three tiny trainings: 2.5 minutes at a load of 9 on 2 cores, 6 at a load of 20
def test_a_fold_streamed_over_http_killed_then_resumed_from_s3_equals_one_trained_from_the_folder(
    packed, served, s3, tmp_path
):
    """The trainings are shared: the first epoch and a step streamed from nginx, killed, the
    rest (the epoch replayed to the step, the second evaluation) from S3 through a cache."""
    local = run(packed, tmp_path / "local", EPOCHS)
    assert local.returncode == 0, local.stderr[-3000:]
    per_epoch = json.loads((tmp_path / "local" / FOLD / "summary.json").read_text())["steps_per_epoch"]
    url, runs, cache = f"{served.url}/shards", tmp_path / "streamed", tmp_path / "cache"
    killed = run(url, runs, EPOCHS, drill=f"{per_epoch + 1}:KILL")  # mid-epoch, past the first state
    out = runs / FOLD
    assert killed.returncode == -signal.SIGKILL and steps_logged(out / "metrics.jsonl") == per_epoch + 1
    assert f"shards: {url}" in (out / "config.yaml").read_text()
    resumed = run("s3://seg-data/cityscapes", runs, EPOCHS, f"data.cache_dir={cache}")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert_same_training(out, tmp_path / "local" / FOLD)
    # every shard read from S3 is kept under its sha256, byte for byte the packed one
    listed = {s["sha256"]: s["name"] for g in load_manifest(packed)["groups"].values() for s in g["shards"]}
    kept = sorted(cache.iterdir())
    assert kept and all((packed / listed[p.stem]).read_bytes() == p.read_bytes() for p in kept)
    # the environment's credentials reach neither the config nor the logs
    written = (out / "config.yaml").read_text() + resumed.stdout + resumed.stderr
    assert "s3://seg-data/cityscapes" in written and "seg-test-secret" not in written and "seg-test-key" not in written


# --- refusals: one line each ------------------------------------------------------------------


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_403_and_404_over_http_name_the_url_and_what_to_check(packed, served):
    with pytest.raises(ManifestError) as denied:
        load_manifest(f"{served.url}/denied/shards")
    assert one_line(denied).startswith(f"{served.url}/denied/shards/manifest.json: 403 Forbidden")
    with pytest.raises(ManifestError) as missing:
        load_manifest(f"{served.url}/no-such-folder/")
    message = one_line(missing)
    assert message.startswith(f"{served.url}/no-such-folder/manifest.json: 404") and "data.shards" in message


def test_403_and_a_missing_key_on_s3_name_the_object_and_what_to_check(s3, monkeypatch):
    with pytest.raises(ManifestError) as missing:
        load_manifest("s3://seg-data/elsewhere")
    message = one_line(missing)
    assert message.startswith("s3://seg-data/elsewhere/manifest.json: 404 NoSuchKey") and "AWS_ENDPOINT_URL" in message

    # moto checks credentials once told to (its reset-auth API): these are then unknown to it
    def checked_after(requests: bytes) -> None:
        reset = f"{s3.env['AWS_ENDPOINT_URL']}/moto-api/reset-auth"
        urllib.request.urlopen(urllib.request.Request(reset, data=requests, headers={"Content-Type": "text/plain"}))

    checked_after(b"0")
    try:
        with pytest.raises(ManifestError) as denied:
            load_manifest("s3://seg-data/cityscapes")
    finally:
        checked_after(b"inf")
    message = one_line(denied)
    assert message.startswith("s3://seg-data/cityscapes/manifest.json: 403") and "AWS_ACCESS_KEY_ID" in message
    assert "seg-test-secret" not in message


def test_credentials_in_the_url_and_pipe_without_the_opt_in_are_refused(tmp_path, monkeypatch, packed):
    with pytest.raises(ManifestError) as user:
        load_manifest("https://someone:hunter2@example.org/shards")
    assert "hunter2" not in one_line(user) and "environment" in str(user.value)
    with pytest.raises(ManifestError) as query:
        load_manifest("https://example.org/shards?X-Amz-Signature=abc")
    assert "abc" not in one_line(query)
    template = f"pipe:cat {packed}/{{name}}"
    monkeypatch.delenv(remote.PIPE_OPT_IN, raising=False)
    with pytest.raises(ManifestError) as refused:
        load_manifest(template)
    assert f"set {remote.PIPE_OPT_IN}=1" in one_line(refused)
    # opted in: the template is split into arguments, then the manifest's name goes in (no shell)
    monkeypatch.setenv(remote.PIPE_OPT_IN, "1")
    assert same(items(EvalStream(shards_of(template, ["val"]))), items(EvalStream(shards_of(packed, ["val"]))))
    with pytest.raises(RemoteError, match="not a plain file name"):
        Store.of(template).read("x; touch owned")
    assert not Path("owned").exists()


def train_refusal(shards: str, runs: Path, capsys) -> str:
    """seg/train.py in this process on ``shards``, refused (exit 2): its stderr."""
    argv = ["--config", str(REPO / "configs" / "demo.yaml"), "--fold", "0", f"data.shards={shards}",
            f"train.runs_dir={runs}", "wandb.mode=disabled"]  # fmt: skip
    capsys.readouterr()
    assert train_main(argv) == 2
    return capsys.readouterr().err


def test_urls_of_other_schemes_and_malformed_ones_are_refused_as_such_not_read_as_folders(tmp_path, capsys):
    with pytest.raises(ManifestError) as ftp:
        load_manifest("ftp://host/x")
    assert one_line(ftp) == "unsupported scheme ftp:// in data.shards ftp://host/x: use a folder, http(s):// or s3://"
    for malformed in ("http:/bad", "https:bad", "s3:/bucket/x"):
        with pytest.raises(ManifestError) as refused:
            load_manifest(malformed)
        assert one_line(refused).startswith(f"data.shards {malformed}: a malformed "), malformed
    with pytest.raises(ManifestError) as hidden:
        load_manifest("ftp://someone:hunter2@host/x")
    message = one_line(hidden)
    assert message.startswith("unsupported scheme ftp:// in data.shards ftp://host/x...: ") and "hunter2" not in message
    # what seg/train.py says of them: once (not a folder's 'not found')
    err = train_refusal("ftp://host/x", tmp_path, capsys)
    assert err == "error: unsupported scheme ftp:// in data.shards ftp://host/x: use a folder, http(s):// or s3://\n"
    assert train_refusal("http:/bad", tmp_path, capsys).startswith("error: data.shards http:/bad: a malformed http URL")


def test_an_html_page_for_the_manifest_is_named_by_its_content_type_not_as_bad_json(served, monkeypatch):
    pauses = []
    monkeypatch.setattr(remote, "_pause", pauses.append)
    with pytest.raises(ManifestError) as login:
        load_manifest(f"{served.url}/login/shards")  # nginx answers 200 with a sign-in page, as a login proxy does
    message = one_line(login)
    assert message.startswith(f"{served.url}/login/shards/manifest.json: got text/html (the Content-Type), not JSON")
    assert "login page" in message and "check data.shards" in message and pauses == []


def test_a_stalled_server_is_said_while_waited_for_and_its_manifest_tried_one_round_a_run(
    stalled, tmp_path, monkeypatch, capsys
):
    """A server that takes the connection and never answers: each retry is said on stderr, and
    the run (which reads the manifest for its identity, then for its data) says the failure
    once, after one round of tries, not two."""
    assert remote.TIMEOUT_S == 15  # per connect and per read, pip's default (it was 60: 3 tries took 3 minutes)
    monkeypatch.setattr(remote, "TIMEOUT_S", 0.2)
    pauses = []
    monkeypatch.setattr(remote, "_pause", pauses.append)
    err = train_refusal(f"{stalled.url}/x", tmp_path, capsys)
    manifest = f"{stalled.url}/x/manifest.json"
    assert err.splitlines() == [
        f"waiting for {manifest} (try 2 of 3, timeout 0.2 s): try 1: cannot connect (timed out)",
        f"waiting for {manifest} (try 3 of 3, timeout 0.2 s): try 2: cannot connect (timed out)",
        f"error: {manifest}: cannot connect (timed out) (tried 3 times)",
    ]
    assert pauses == [1, 2]  # one round: the run refuses at its first read of the manifest


# --- faults: retried, then one line naming the URL and the shard ------------------------------


def fold_shards(url: str) -> list:
    return shards_of(url, ["train-fold0"])


def test_a_server_stopped_mid_epoch_is_retried_and_the_epoch_continues_when_it_is_back(
    packed, served, faulty, monkeypatch
):
    _, url = faulty
    local = items(EvalStream(shards_of(packed, ["train-fold0"])))
    stream = iter(EvalStream(fold_shards(url)))
    seen = items([next(stream)])
    served.stop()  # between two shards: the next one's transfer is refused
    pauses = []
    monkeypatch.setattr(remote, "_pause", lambda s: (pauses.append(s), served.start() if len(pauses) == 2 else None))
    seen += items(stream)
    assert pauses == [1, 2] and same(seen, local)


def test_a_server_that_stays_away_fails_in_one_line_after_bounded_retries(served, faulty, monkeypatch):
    _, url = faulty
    shards = fold_shards(url)
    stream = iter(EvalStream(shards))
    next(stream)
    served.stop()
    pauses = []
    monkeypatch.setattr(remote, "_pause", pauses.append)
    with pytest.raises(RemoteError) as failed:
        list(stream)
    second = shards[1]
    assert one_line(failed).startswith(f"{second.path}: shard {second.name}: cannot connect")
    assert "tried 3 times" in str(failed.value) and pauses == [1, 2]


def test_a_response_cut_off_mid_shard_is_retried_and_the_shard_then_read_whole(packed, served, faulty, monkeypatch):
    _, url = faulty
    shard = fold_shards(url)[0]
    served.stop()
    served.start(limit_rate="2k")  # ten seconds a shard: the cut below lands mid-body
    opened, cuts = remote._http, [True]

    @contextmanager
    def cut_once(address: str):
        with opened(address) as response:
            if cuts and cuts.pop():
                served.stop()  # headers in, the body still coming: nginx closes the connection
            yield response

    pauses = []
    monkeypatch.setattr(remote, "_http", cut_once)
    monkeypatch.setattr(remote, "_pause", lambda s: (pauses.append(s), served.start()))
    assert same(items(EvalStream([shard])), items(EvalStream(shards_of(packed, ["train-fold0"])[:1])))
    assert pauses == [1] and not cuts


def test_a_truncated_shard_is_retried_then_refused_and_no_sample_of_it_is_used(faulty, monkeypatch):
    folder, url = faulty
    shards = fold_shards(url)
    path = folder / shards[1].name
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    monkeypatch.setattr(remote, "_pause", lambda s: None)
    read = []
    with pytest.raises(RemoteError) as failed:
        for item in EvalStream(shards):
            read.append(item["key"])
    assert one_line(failed).startswith(
        f"{shards[1].path}: shard {shards[1].name}: truncated: {len(whole) // 2} of the manifest's {len(whole)} bytes"
    )
    assert len(read) == shards[0].samples  # the first shard's, none of the torn one's
    # put back between two tries, it is read whole
    monkeypatch.setattr(remote, "_pause", lambda s: path.write_bytes(whole))
    assert len(list(shard_samples(shards[1]))) == shards[1].samples


def test_a_corrupted_byte_is_refused_by_its_sha256_naming_url_and_shard(faulty, monkeypatch):
    folder, url = faulty
    shards = fold_shards(url)
    path = folder / shards[0].name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    pauses = []
    monkeypatch.setattr(remote, "_pause", pauses.append)
    with pytest.raises(RemoteError) as failed:
        next(iter(EvalStream(shards)))
    message = one_line(failed)
    assert message.startswith(f"{shards[0].path}: shard {shards[0].name}: sha256 ") and "manifest's" in message
    assert pauses == [1, 2]
    assert verify(url) == [message]  # pack --verify URL says the same
    assert pack_cityscapes.main(["--verify", url]) == 1


def test_the_cache_serves_later_reads_without_the_server(served, faulty, tmp_path):
    _, url = faulty
    shards = shards_of(url, ["val"], cache=str(tmp_path / "cache"))
    first = items(EvalStream(shards))
    served.stop()
    assert same(items(EvalStream(shards)), first) and len(list((tmp_path / "cache").iterdir())) == len(shards)


def test_compare_identifies_shards_named_by_url_by_the_manifest_it_reads_there(packed, served, tmp_path):
    """tools/compare.py's data check: a run trained from the URL and one from the folder trained
    on the same data; a URL that can't be read now is data it cannot identify."""
    streamed, folder = shards_identity(f"{served.url}/shards", tmp_path), shards_identity(str(packed), tmp_path)
    assert streamed.digest == folder.digest and streamed.manifest_path == f"{served.url}/shards/manifest.json"
    assert shards_identity(f"{served.url}/gone", tmp_path).manifest is None
