"""Batch ImageJobs against a real kube-apiserver, moto S3 and real worker processes (issue 10):
counts and results manifest with corrupt items among the inputs, the operator killed
mid-batch resuming without redoing items, the Progress printer column, an item past its
timeout retried in later item groups then failing alone, and cancelling."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gpuroute_dev.localenv.stack import LocalStack, PoolConfig
from tests.images import noise_png

pytestmark = pytest.mark.integration

BUCKET = "gpuroute-batch"
NS = "team-batch"
POOL = "pool-batch"
WORKERS = ("w1", "w2")
COMPLETED = {"outcome": "completed"}
# Around 0.1 s per item on one CPU thread: a batch of a hundred or so stays running for
# several status periods, long enough to watch it, kill the operator or cancel it.
SLOW = [{"op": "upscale", "width": 1024, "method": "lanczos"}, {"op": "blur", "radius": 6}]


def _upload(s3: Any, folder: str, good: int, corrupt: int = 0, size: tuple[int, int] = (24, 16)) -> None:
    client = s3.client()
    for i in range(good):
        client.put_object(Bucket=BUCKET, Key=f"{folder}/img-{i:04d}.png", Body=noise_png(*size, seed=i))
    for i in range(corrupt):
        client.put_object(Bucket=BUCKET, Key=f"{folder}/bad-{i:02d}.png", Body=b"\x89PNG\r\n\x1a\n" + b"junk" * 50)
    client.put_object(Bucket=BUCKET, Key=f"{folder}/notes.txt", Body=b"not matched by *.png")


@pytest.fixture(scope="module")
def stack(control_plane: Any, s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    s3_server.create_bucket(BUCKET)
    stack = LocalStack(tmp_path_factory.mktemp("batch"), control_plane, s3_server, namespace="gpuroute-batch")
    stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
    stack.add_pool(PoolConfig(POOL, workers=WORKERS, max_in_flight_per_worker=2))
    stack.start_operator()
    for worker in WORKERS:
        stack.start_worker(POOL, worker, capacity=2)
    stack.wait_for_pool(POOL, workers=2, timeout=90)
    yield stack
    stack.stop()


def _computed(stack: LocalStack) -> float:
    return sum(stack.worker_metric(w, "gpuroute_worker_jobs_total", COMPLETED) for w in WORKERS)


def _batch(folder: str, steps: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"input": {"prefix": f"s3://{BUCKET}/in/{folder}/", "match": "*.png"},
            "output": {"prefix": f"s3://{BUCKET}/out/{folder}/", "format": "png"},
            "steps": steps or [{"op": "invert"}], "maxAttempts": 2, **extra}


def _manifest(s3: Any, uri: str) -> list[dict[str, Any]]:
    key = uri.removeprefix(f"s3://{BUCKET}/")
    body = s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line]


def _wait(stack: LocalStack, name: str, check: Any, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = stack.get_job(NS, name).get("status") or {}
        if check(status):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: {status}\n{stack.operator.log_tail(30) if stack.operator else ''}")
        time.sleep(0.2)


def _table_row(stack: LocalStack, name: str) -> dict[str, Any]:
    """What `kubectl get ij` prints: the apiserver's Table rendering of the printer columns."""
    api = stack.custom.api_client
    headers = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}
    for auth in api.configuration.auth_settings().values():  # the bearer token, where the stack uses one
        headers[auth["key"]] = auth["value"]
    response = api.call_api("GET", f"{api.configuration.host}/apis/gpuroute.io/v1alpha1/namespaces/{NS}/imagejobs/{name}",
                            header_params=headers)
    response.read()
    data = json.loads(response.data)
    assert "columnDefinitions" in data, data
    names = [c["name"] for c in data["columnDefinitions"]]
    return dict(zip(names, data["rows"][0]["cells"], strict=True))


def test_batch_runs_to_counts_with_a_correct_manifest(stack: LocalStack, s3_server: Any) -> None:
    _upload(s3_server, "in/mixed", good=300, corrupt=6)
    before = _computed(stack)
    stack.create_job(NS, "mixed", _batch("mixed"))
    status = stack.wait_for_jobs(NS, ["mixed"], timeout=300)["mixed"]["status"]

    assert (status["phase"], status["reason"]) == ("Failed", "ItemsFailed"), status
    assert status["items"] == {"total": 306, "succeeded": 300, "failed": 6, "running": 0, "queued": 0,
                               "listingComplete": True}
    assert status["progress"] == "306/306" and status["percent"] == 100.0
    assert {f["reason"] for f in status["failures"]} == {"InvalidInput"} and len(status["failures"]) == 6
    assert all("/bad-" in f["input"] for f in status["failures"])
    assert _computed(stack) - before == 300  # each good image computed once
    rows = _manifest(s3_server, status["results"])
    assert len(rows) == 306 and len({r["input"] for r in rows}) == 306
    client = s3_server.client()
    for row in rows:
        if row["status"] == "succeeded":
            key = row["output"].removeprefix(f"s3://{BUCKET}/")
            assert key == row["input"].removeprefix(f"s3://{BUCKET}/").replace("in/", "out/", 1)
            stored = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
            assert hashlib.sha256(stored).hexdigest() == row["sha256"] and len(stored) == row["size"]
            assert row["timing"]["totalMs"] > 0 and row["attempts"] == 1
        else:
            assert row["reason"] == "InvalidInput" and row["error"] and row["output"] is None
    assert _table_row(stack, "mixed")["Progress"] == "306/306"
    events = stack.core.list_namespaced_event(NS, field_selector="involvedObject.name=mixed").items
    assert [e.reason for e in events] == ["ItemsFailed"]  # one Event per batch, none per item


def test_progress_column_while_running_then_healthy_counts(stack: LocalStack, s3_server: Any) -> None:
    _upload(s3_server, "in/progress", good=120, size=(256, 192))
    stack.create_job(NS, "progress", _batch("progress", SLOW))
    _wait(stack, "progress", lambda s: s.get("phase") == "Processing" and s.get("items", {}).get("succeeded", 0) > 0)
    shown = _table_row(stack, "progress")["Progress"]
    done, total = shown.rstrip("+").split("/")
    assert 0 < int(done) < 120 and int(total) == 120, shown
    status = stack.wait_for_jobs(NS, ["progress"], timeout=300)["progress"]["status"]
    assert (status["phase"], status["items"]["succeeded"]) == ("Completed", 120), status


def test_operator_killed_mid_batch_resumes_without_redoing_items(stack: LocalStack, s3_server: Any) -> None:
    _upload(s3_server, "in/resume", good=150, size=(256, 192))
    before = _computed(stack)
    stack.create_job(NS, "resume", _batch("resume", SLOW))
    _wait(stack, "resume", lambda s: s.get("items", {}).get("succeeded", 0) >= 30)
    assert stack.operator is not None
    stack.operator.kill()
    stack.start_operator()
    status = stack.wait_for_jobs(NS, ["resume"], timeout=300)["resume"]["status"]
    assert (status["phase"], status["items"]["succeeded"]) == ("Completed", 150), status
    rows = _manifest(s3_server, status["results"])
    assert len(rows) == 150 and len({r["input"] for r in rows}) == 150
    # Finished items are not run again: the journal in S3 outlived the operator, and items
    # in flight at the kill were answered by the workers that held them.
    assert _computed(stack) - before == 150


def test_an_item_past_its_timeout_is_retried_in_later_groups_then_fails_alone(stack: LocalStack, s3_server: Any) -> None:
    # The same 12 steps (x4 then back, six times) are instant on the 16x16 images and seconds of
    # CPU on the two 1536x1536 ones, so only those pass itemTimeoutSeconds: each is tried
    # maxAttempts times, in later groups, and fails alone; the small images succeed.
    _upload(s3_server, "in/overtime", good=40, size=(16, 16))
    client = s3_server.client()
    for name in ("img-0003-big.png", "img-0030-big.png"):
        client.put_object(Bucket=BUCKET, Key=f"in/overtime/{name}", Body=noise_png(1536, 1536, seed=7))
    steps = [{"op": "upscale", "scale": 4.0, "method": "lanczos"}, {"op": "resize", "scale": 0.25, "method": "lanczos"}] * 6
    stack.create_job(NS, "overtime", _batch("overtime", steps, itemTimeoutSeconds=2, maxAttempts=3))
    status = stack.wait_for_jobs(NS, ["overtime"], timeout=300)["overtime"]["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "ItemsFailed"), status
    assert (status["items"]["succeeded"], status["items"]["failed"]) == (40, 2), status["items"]
    assert {f["reason"] for f in status["failures"]} == {"MaxAttemptsExceeded"}
    assert all("-big.png" in f["input"] and "itemTimeoutSeconds" in f["message"] for f in status["failures"])
    rows = {r["input"].rsplit("/", 1)[1]: r for r in _manifest(s3_server, status["results"])}
    assert len(rows) == 42
    assert rows["img-0003-big.png"]["attempts"] == rows["img-0030-big.png"]["attempts"] == 3
    # A small image queued behind a big one on a worker's device may have been cut off once
    # itself (the timeout counts its wait for the device); it then succeeded in a later group.
    assert all(r["status"] == "succeeded" and r["attempts"] <= 2 for name, r in rows.items() if "-big" not in name)


def test_cancel_stops_outstanding_items(stack: LocalStack, s3_server: Any) -> None:
    _upload(s3_server, "in/cancel", good=200, size=(256, 192))
    stack.create_job(NS, "cancel", _batch("cancel", SLOW))
    _wait(stack, "cancel", lambda s: s.get("items", {}).get("succeeded", 0) >= 5)
    stack.custom.patch_namespaced_custom_object(
        "gpuroute.io", "v1alpha1", NS, "imagejobs", "cancel", {"metadata": {"annotations": {"gpuroute.io/cancel": "true"}}})
    status = stack.wait_for_jobs(NS, ["cancel"], timeout=60)["cancel"]["status"]
    assert (status["phase"], status["reason"]) == ("Cancelled", "CancelRequested"), status
    settled = _computed(stack)
    time.sleep(3)
    assert _computed(stack) - settled <= 4  # at most what was already on a worker's device
    assert status["items"]["succeeded"] < 200
    assert len(_manifest(s3_server, status["results"])) == status["items"]["succeeded"] + status["items"]["failed"]


def test_a_listing_past_max_items_ends_failed_naming_the_field(stack: LocalStack, s3_server: Any) -> None:
    _upload(s3_server, "in/toomany", good=40)
    spec = _batch("toomany")
    spec["input"]["maxItems"] = 20
    stack.create_job(NS, "toomany", spec)
    status = stack.wait_for_jobs(NS, ["toomany"], timeout=120)["toomany"]["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "TooManyItems"), status
    assert "spec.input.maxItems=20" in status["message"]
    events = stack.core.list_namespaced_event(NS, field_selector="involvedObject.name=toomany").items
    assert [e.reason for e in events] == ["TooManyItems"]


def test_a_batch_whose_journal_is_corrupt_fails_alone(stack: LocalStack, s3_server: Any) -> None:
    # The journal lies in the tenant's own output prefix: whatever is written there must end
    # that batch, never the operator or the batches beside it.
    _upload(s3_server, "in/corrupt", good=20)
    _upload(s3_server, "in/beside", good=20)
    assert stack.operator is not None
    stack.operator.kill()
    stack.create_job(NS, "corrupt", _batch("corrupt"))
    uid = stack.get_job(NS, "corrupt")["metadata"]["uid"]
    s3_server.client().put_object(Bucket=BUCKET, Key=f"out/corrupt/_gpuroute/journal-{uid}/part-00000001.jsonl",
                                  Body=b'{"input":"s3://x/y"}\n' + b"[" * (2 * 1024 * 1024))
    stack.create_job(NS, "beside", _batch("beside"))
    stack.start_operator()
    statuses = stack.wait_for_jobs(NS, ["corrupt", "beside"], timeout=180)
    corrupt, beside = statuses["corrupt"]["status"], statuses["beside"]["status"]
    assert (corrupt["phase"], corrupt["reason"]) == ("Failed", "JournalCorrupt"), corrupt
    assert "part-00000001.jsonl" in corrupt["message"]
    assert (beside["phase"], beside["items"]["succeeded"]) == ("Completed", 20), beside
    assert stack.operator.popen.poll() is None  # the operator lives on


def test_inputs_naming_the_same_output_fail_after_the_first_and_overlapping_prefixes_are_refused(
        stack: LocalStack, s3_server: Any) -> None:
    client = s3_server.client()
    for seed, name in enumerate(("a.jpg", "a.png", "a.webp", "b.png")):
        client.put_object(Bucket=BUCKET, Key=f"in/clash/{name}", Body=noise_png(16, 16, seed=seed))
    spec = _batch("clash")
    spec["input"].pop("match")
    stack.create_job(NS, "clash", spec)
    status = stack.wait_for_jobs(NS, ["clash"], timeout=120)["clash"]["status"]
    assert (status["phase"], status["reason"]) == ("Failed", "ItemsFailed"), status
    rows = {r["input"].rsplit("/", 1)[1]: r for r in _manifest(s3_server, status["results"])}
    assert {n: r["status"] for n, r in rows.items()} == {"a.jpg": "succeeded", "a.png": "failed",
                                                         "a.webp": "failed", "b.png": "succeeded"}
    assert {rows[n]["reason"] for n in ("a.png", "a.webp")} == {"OutputCollision"}
    assert f"s3://{BUCKET}/out/clash/a.png" in rows["a.png"]["error"]
    stored = client.get_object(Bucket=BUCKET, Key="out/clash/a.png")["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == rows["a.jpg"]["sha256"]  # the first input's output survives

    overlap = _batch("overlap")
    overlap["input"]["prefix"] = f"s3://{BUCKET}/out/overlap/in/"
    stack.create_job(NS, "overlap", overlap)
    refused = stack.wait_for_jobs(NS, ["overlap"], timeout=60)["overlap"]["status"]
    assert (refused["phase"], refused["reason"]) == ("Failed", "InvalidSpec"), refused
    assert "spec.input.prefix" in refused["message"] and "spec.output.prefix" in refused["message"]


def test_a_revoked_read_grant_ends_the_items_not_yet_handed_out(stack: LocalStack, s3_server: Any) -> None:
    # Last in this module: it restarts the workers. With no worker connected, the first 512
    # items fill the batch's window and wait in the queue; the other 18 are handed out only
    # after the admin has revoked the read grant, so they end StorageNotGranted rather than
    # getting freshly presigned URLs for a prefix the namespace may no longer read.
    from gpuroute_operator.shell.engine import GRANTS_TTL_S

    _upload(s3_server, "in/revoke", good=530, size=(16, 16))
    for worker in WORKERS:
        stack.workers[worker].stop()
    stack.wait_for_pool(POOL, workers=0, timeout=60)
    stack.create_job(NS, "revoke", _batch("revoke"))
    _wait(stack, "revoke", lambda s: s.get("items", {}).get("listingComplete") and s["items"]["total"] == 530)
    try:
        stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/elsewhere/"], write=[f"s3://{BUCKET}/out/"])
        time.sleep(GRANTS_TTL_S + 1.5)  # the operator's cached grants expire; the batch reads them each round
        for worker in WORKERS:
            stack.start_worker(POOL, worker, capacity=2)
        status = stack.wait_for_jobs(NS, ["revoke"], timeout=300)["revoke"]["status"]
    finally:
        stack.ensure_namespace(NS, read=[f"s3://{BUCKET}/in/"], write=[f"s3://{BUCKET}/out/"])
    assert (status["items"]["succeeded"], status["items"]["failed"]) == (512, 18), status["items"]
    assert {f["reason"] for f in status["failures"]} == {"StorageNotGranted"}
    rows = _manifest(s3_server, status["results"])
    revoked = sorted(r["input"].rsplit("/", 1)[1] for r in rows if r["status"] == "failed")
    assert revoked == [f"img-{i:04d}.png" for i in range(512, 530)]  # the listing's last, never handed out
