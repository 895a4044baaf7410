"""The `gpuroute` command line: parsing of every subcommand, key generation, --model."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
import yaml

from gpuroute import cli
from gpuroute.curve_keys import KeyError_, KeyPair, parse_key

DIGEST = "ab" * 32


@pytest.fixture(autouse=True)
def _no_env_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    # build_parser reads the operator namespace default from the environment.
    for name in ("GPUROUTE_NAMESPACE", "GPUROUTE_SERVER_SECRET_KEY", "GPUROUTE_WORKER_SECRET_KEY",
                 "GPUROUTE_SERVER_PUBLIC_KEY", "GPUROUTE_STATUS_TLS_CERT", "GPUROUTE_STATUS_TLS_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_operator_defaults() -> None:
    args = cli.build_parser().parse_args(["operator"])
    assert args.command == "operator"
    assert args.func is cli._cmd_operator
    assert (args.bind, args.server_key_file, args.namespace, args.kubeconfig) == (
        "tcp://0.0.0.0:7700", None, "gpuroute-system", None)
    assert (args.web_port, args.metrics_port, args.liveness_port) == (9091, 9090, 8080)
    assert (args.dev_plaintext, args.verbose) == (False, False)
    assert args.web_bind == "0.0.0.0"
    assert args.scaling_azure_ad_scope == []  # only the AKS scope for the operator's Azure AD token


def test_operator_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUROUTE_NAMESPACE", "from-env")
    assert cli.build_parser().parse_args(["operator"]).namespace == "from-env"
    args = cli.build_parser().parse_args([
        "-v", "operator", "--bind", "tcp://127.0.0.1:1", "--server-key-file", "/k", "--namespace", "ns",
        "--kubeconfig", "/kc", "--web-port", "0", "--liveness-port", "0", "--dev-plaintext"])
    assert args.verbose is True
    assert (args.bind, args.server_key_file, args.namespace, args.kubeconfig) == ("tcp://127.0.0.1:1", "/k", "ns", "/kc")
    assert (args.web_port, args.liveness_port, args.dev_plaintext) == (0, 0, True)
    scopes = cli.build_parser().parse_args(["operator", "--scaling-azure-ad-scope", "api://a/.default",
                                            "--scaling-azure-ad-scope", "api://b/.default"])
    assert scopes.scaling_azure_ad_scope == ["api://a/.default", "api://b/.default"]


def test_worker_defaults_and_required() -> None:
    args = cli.build_parser().parse_args(["worker", "--operator", "tcp://op:7700", "--pool", "gpu-a"])
    assert args.func is cli._cmd_worker
    assert (args.operator, args.pool, args.id, args.key_file, args.server_public_key_file) == (
        "tcp://op:7700", "gpu-a", None, None, None)
    assert (args.capacity, args.max_batch, args.max_batch_wait_ms, args.device) == (4, 8, 5.0, "auto")
    assert (args.health_port, args.threads, args.model) == (8081, None, [])
    assert args.listen is None


def test_worker_listen_instead_of_dialing() -> None:
    args = cli.build_parser().parse_args(["worker", "--listen", "tcp://0.0.0.0:7701", "--pool", "gpu-a"])
    assert (args.operator, args.listen) == (None, "tcp://0.0.0.0:7701")


@pytest.mark.parametrize("argv", [
    ["worker", "--pool", "p"],
    ["worker", "--operator", "tcp://x:1", "--listen", "tcp://0.0.0.0:1", "--pool", "p"],
    ["worker", "--operator", "tcp://x:1"],
    ["worker", "--operator", "tcp://x:1", "--pool", "p", "--capacity", "four"],
    [],
    ["bogus"],
    ["keys"],
    ["keys", "admin"],
])
def test_parse_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(argv)
    assert caught.value.code == 2
    assert "usage: gpuroute" in capsys.readouterr().err


def test_worker_models() -> None:
    args = cli.build_parser().parse_args([
        "worker", "--operator", "tcp://op:7700", "--pool", "p", "--id", "w1", "--capacity", "2",
        "--device", "cuda:1", "--threads", "3",
        "--model", f"x4=s3://models/realesrgan-x4.pth#{DIGEST.upper()}",
        "--model", f"x2=https://h/m.pth#frag#{DIGEST}"])
    assert (args.id, args.capacity, args.device, args.threads) == ("w1", 2, "cuda:1", 3)
    x4, x2 = args.model
    assert (x4.name, x4.uri, x4.sha256) == ("x4", "s3://models/realesrgan-x4.pth", DIGEST)
    # Only the last '#' separates the digest.
    assert (x2.name, x2.uri, x2.sha256) == ("x2", "https://h/m.pth#frag", DIGEST)


@pytest.mark.parametrize("value", [
    f"s3://models/x.pth#{DIGEST}",          # no NAME=
    f"=s3://models/x.pth#{DIGEST}",         # empty name
    "x4=s3://models/x.pth",                 # no digest
    f"x4=s3://models/x.pth#{DIGEST[:-1]}",  # 63 characters
    f"x4=s3://models/x.pth#{DIGEST}0",      # 65 characters
])
def test_model_option_errors(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.build_parser().parse_args(["worker", "--operator", "tcp://x:1", "--pool", "p", "--model", value])
    assert caught.value.code == 2
    assert f"--model expects NAME=URI#SHA256, got {value!r}" in capsys.readouterr().err


def test_parse_model_directly() -> None:
    spec = cli._parse_model(f"m=/weights/m.pth#{DIGEST}")
    assert (spec.name, spec.uri, spec.sha256) == ("m", "/weights/m.pth", DIGEST)
    with pytest.raises(Exception) as caught:
        cli._parse_model("m=/weights/m.pth")
    assert type(caught.value).__name__ == "ArgumentTypeError"


def test_model_digest_must_be_hex() -> None:
    # 64 characters that are not a hex SHA-256 can never match a file's digest.
    with pytest.raises(Exception) as caught:
        cli._parse_model("m=/weights/m.pth#" + "z" * 64)
    assert type(caught.value).__name__ == "ArgumentTypeError"


def test_keys_and_demo_parse() -> None:
    args = cli.build_parser().parse_args(["keys", "worker", "--pool", "p"])
    assert args.func is cli._cmd_keys
    assert (args.role, args.pool, args.name, args.namespace, args.worker_namespace, args.out_dir) == (
        "worker", "p", "worker", "gpuroute-system", "gpuroute-workers", None)
    demo = cli.build_parser().parse_args(["demo"])
    assert demo.func is cli._cmd_demo
    assert (demo.workdir, demo.output_dir, demo.workers, demo.keep_running) == (None, "demo-output", 2, False)
    demo = cli.build_parser().parse_args(["demo", "--workers", "3", "--keep-running", "--workdir", "/w"])
    assert (demo.workdir, demo.workers, demo.keep_running) == ("/w", 3, True)


def _secrets(text: str) -> list[dict]:
    docs = list(yaml.safe_load_all(text))
    assert all(d["kind"] == "Secret" and d["apiVersion"] == "v1" for d in docs)
    return docs


def test_main_keys_worker_prints_two_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "worker", "--pool", "p"]) == 0
    worker, pool = _secrets(capsys.readouterr().out)
    assert (worker["metadata"]["name"], worker["metadata"]["namespace"]) == ("gpuroute-worker-p", "gpuroute-workers")
    assert (pool["metadata"]["name"], pool["metadata"]["namespace"]) == ("gpuroute-pool-p-keys", "gpuroute-system")
    assert set(worker["data"]) == {"worker.key_secret"}
    assert set(pool["data"]) == {"worker.key"}
    secret = parse_key(base64.b64decode(worker["data"]["worker.key_secret"]), source="worker")
    public = parse_key(base64.b64decode(pool["data"]["worker.key"]), source="pool")
    assert KeyPair.from_secret(secret).public == public


def test_main_keys_worker_with_name_namespaces_and_out_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    assert cli.main(["keys", "worker", "--pool", "gpu-a", "--name", "w3", "--namespace", "mgmt",
                     "--worker-namespace", "gpus", "--out-dir", str(out)]) == 0
    worker, pool = _secrets(capsys.readouterr().out)
    assert worker["metadata"]["namespace"] == "gpus" and pool["metadata"]["namespace"] == "mgmt"
    secret_file, public_file = out / "gpu-a-w3.key_secret", out / "gpu-a-w3.key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert base64.b64decode(worker["data"]["worker.key_secret"]) + b"\n" == secret_file.read_bytes()
    assert base64.b64decode(pool["data"]["w3.key"]) + b"\n" == public_file.read_bytes()


def test_main_keys_operator(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["keys", "operator", "--out-dir", str(tmp_path)]) == 0
    own, public = _secrets(capsys.readouterr().out)
    assert own["metadata"]["name"] == "gpuroute-operator-curve"
    assert public["metadata"]["name"] == "gpuroute-operator-public"
    secret = base64.b64decode(own["data"]["server.key_secret"])
    assert KeyPair.from_secret(secret).public == base64.b64decode(public["data"]["server.key"])
    assert (tmp_path / "server.key_secret").read_bytes() == secret + b"\n"


def test_main_keys_worker_needs_pool(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["keys", "worker"])
    assert caught.value.code == "gpuroute keys worker: --pool is required"
    assert capsys.readouterr().out == ""


def test_env_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pair = KeyPair.generate()
    monkeypatch.setenv("GPUROUTE_TEST_KEY", pair.secret.decode() + "\n")
    assert cli._env_key(None, "GPUROUTE_TEST_KEY", "the key") == pair.secret
    path = tmp_path / "k"
    path.write_bytes(pair.public)
    assert cli._env_key(str(path), "GPUROUTE_TEST_KEY", "the key") == pair.public  # the file wins
    monkeypatch.delenv("GPUROUTE_TEST_KEY")
    with pytest.raises(SystemExit) as caught:
        cli._env_key(None, "GPUROUTE_TEST_KEY", "the key")
    assert caught.value.code == "gpuroute: the key is required (a file option or $GPUROUTE_TEST_KEY)"
    monkeypatch.setenv("GPUROUTE_TEST_KEY", "junk")
    with pytest.raises(KeyError_, match=r"\$GPUROUTE_TEST_KEY: not a Z85 CURVE key"):
        cli._env_key(None, "GPUROUTE_TEST_KEY", "the key")


def test_main_reports_bad_key_file_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "server.key_secret"
    bad.write_text("not a key\n")
    assert cli.main(["operator", "--server-key-file", str(bad)]) == 2
    assert f"gpuroute: {bad}: not a Z85 CURVE key" in capsys.readouterr().err


# -- the status API's flags (security review, finding 5) ---------------------------------

def _web(*argv: str):
    return cli._web_config(cli.build_parser().parse_args(["operator", *argv]))


def test_status_api_defaults_refuse_plain_http_on_every_address(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["operator"])
    assert (args.status_tls_cert, args.status_tls_key, args.status_insecure_http) == (None, None, False)
    assert (args.status_audience, args.status_no_apiserver_audience) == ([], False)
    with pytest.raises(SystemExit, match="plain HTTP on 0.0.0.0:9091.*--status-tls-cert"):
        _web()


def test_status_api_plain_http_on_loopback_disabled_or_explicitly_insecure() -> None:
    local = _web("--web-bind", "127.0.0.1")
    assert (local.bind, local.tls, local.insecure_http) == ("127.0.0.1", None, False)
    assert local.audiences == ("gpuroute",) and local.apiserver_audience is True and local.cache_ttl_s <= 5.0
    assert _web("--web-port", "0").port is None
    insecure = _web("--status-insecure-http")
    assert (insecure.bind, insecure.tls, insecure.insecure_http) == ("0.0.0.0", None, True)


def test_status_api_tls_from_files_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpuroute_dev.localenv.tls import self_signed

    cert, key = self_signed(tmp_path)
    config = _web("--status-tls-cert", str(cert), "--status-tls-key", str(key))
    assert config.tls is not None and (config.tls.cert, config.tls.key) == (str(cert), str(key))
    assert config.bind == "0.0.0.0" and config.insecure_http is False
    # The Deployment passes the mounted Secret's files through the environment.
    monkeypatch.setenv("GPUROUTE_STATUS_TLS_CERT", str(cert))
    monkeypatch.setenv("GPUROUTE_STATUS_TLS_KEY", str(key))
    from_env = _web()
    assert from_env.tls == config.tls


@pytest.mark.parametrize("argv", [
    ["--status-tls-cert", "/c.pem"],
    ["--status-tls-key", "/k.pem"],
])
def test_status_api_tls_flags_go_together(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="go together"):
        _web(*argv)


def test_status_api_unreadable_certificate_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / "bad.pem").write_text("not a certificate\n")
    with pytest.raises(SystemExit, match="cannot load the status API certificate"):
        _web("--status-tls-cert", str(tmp_path / "bad.pem"), "--status-tls-key", str(tmp_path / "bad.pem"))
    with pytest.raises(SystemExit, match="cannot load the status API certificate"):
        _web("--status-tls-cert", str(tmp_path / "missing.pem"), "--status-tls-key", str(tmp_path / "missing.pem"))


def test_status_api_audiences() -> None:
    config = _web("--web-bind", "127.0.0.1", "--status-audience", "images", "--status-audience", "gpuroute",
                  "--status-audience", "images", "--status-no-apiserver-audience")
    assert config.audiences == ("images", "gpuroute") and config.apiserver_audience is False
