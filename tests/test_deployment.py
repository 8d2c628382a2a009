"""Edge deployment: certificates, the server/client command wrappers, and a real TLS +
site-authentication deployment on loopback (flower-superlink, flower-supernode, flwr run)."""
from __future__ import annotations

import json
from pathlib import Path
import stat
import time

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from fedssl.client.supernode import ClientSetupError, SuperNodeSettings, supernode_command
from fedssl.common.checkpoint import load_weights
from fedssl.common.config import RunConfig
from fedssl.common.methods import build_method
from fedssl.server.certs import CertError, make_certs
from fedssl.server.superlink import ServerSetupError, SuperLinkSettings, superlink_command
from fedssl.simulations.cli import main as fedssl
from fedssl.simulations.loopback import LoopbackDeployment

from fedssl.common.synthetic import write_image_folder

TINY = dict(batch_size=8, proj_dim=32, hidden_dim=64, knn_k=10, eval_bank_size=64,
            eval_query_size=32, probe=False, local_epochs=1, fraction_train=1.0)


# ----------------------------------------------------------------- certificates, commands


def test_certs_files_modes_sans_and_key_formats(tmp_path, capsys):
    out = tmp_path / "certs"
    assert fedssl(["certs", "--out", str(out), "--host", "fl.example.org", "--host", "10.0.0.5",
                   "--site", "site0", "--site", "site1"]) == 0
    printed = capsys.readouterr().out
    assert "flwr supernode register" in printed and f"wrote {out / 'ca.key'}" in printed
    for name in ("ca.key", "server.key", "sites/site0.key", "sites/site1.key"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o600, name
    cert = x509.load_pem_x509_certificate((out / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    # the formats Flower reads: an OpenSSH EC private key, an OpenSSH NIST-curve public key
    assert isinstance(load_ssh_private_key((out / "sites/site0.key").read_bytes(), None),
                      ec.EllipticCurvePrivateKey)
    from flwr.cli.supernode.register import try_load_public_key
    assert try_load_public_key(out / "sites/site0.pub")


def test_certs_refuse_to_overwrite_without_force_and_add_a_site(tmp_path, capsys):
    out = tmp_path / "certs"
    make_certs(out, ["localhost"], ["site0"])
    before = (out / "ca.crt").read_bytes()
    with pytest.raises(CertError, match="refusing to overwrite.*--force"):
        make_certs(out, ["localhost"], ["site0"])
    assert fedssl(["certs", "--out", str(out), "--host", "localhost"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    # a new site: only its key pair, the CA stays
    assert [p.name for p in make_certs(out, [], ["site2"], keys_only=True)] == ["site2.key", "site2.pub"]
    assert (out / "ca.crt").read_bytes() == before
    make_certs(out, ["localhost"], ["site0"], force=True)
    assert (out / "ca.crt").read_bytes() != before
    with pytest.raises(CertError, match="--host"):
        make_certs(tmp_path / "other", [], ["site0"])


def test_server_command_is_tls_with_auth_unless_insecure(tmp_path):
    certs = tmp_path / "certs"
    make_certs(certs, ["localhost"], [])
    cmd = superlink_command(SuperLinkSettings(workdir=tmp_path, certs=certs))
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--database", "--log-file", "--disable-runtime-dependency-installation"):
        assert flag in cmd
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "state" / "superlink.db")
    assert "--insecure" not in cmd
    assert cmd[1:5] == ["-m", "fedssl.server.superlink_launch", "--db-busy-timeout", "60"]
    exact = superlink_command(SuperLinkSettings(workdir=tmp_path, certs=certs, db_busy_timeout=0))
    assert Path(exact[0]).name == "flower-superlink" and exact[1:] == cmd[5:]
    with pytest.raises(ServerSetupError, match="--insecure"):
        superlink_command(SuperLinkSettings(workdir=tmp_path))
    plain = superlink_command(SuperLinkSettings(workdir=tmp_path, insecure=True))
    assert "--insecure" in plain and "--enable-supernode-auth" not in plain


def test_client_command_checks_and_node_config(tmp_path):
    certs = tmp_path / "certs"
    make_certs(certs, ["localhost"], ["site0"])
    images = write_image_folder(tmp_path / "images", per_class=1)
    settings = SuperNodeSettings(superlink="srv:8000", data_path=images, ca=certs / "ca.crt",
                                 key=certs / "sites/site0.key", threads=3, port=9100)
    cmd = supernode_command(settings)
    assert cmd[cmd.index("--root-certificates") + 1] == str(certs / "ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(certs / "sites/site0.key")
    assert cmd[cmd.index("--node-config") + 1] == f'data-path="{images}" threads=3 device="auto"'
    assert "--insecure" not in cmd
    with pytest.raises(ClientSetupError, match="--ca.*--insecure"):
        supernode_command(SuperNodeSettings(superlink="srv:8000", data_path=images))
    with pytest.raises(ClientSetupError, match="no such folder"):
        supernode_command(SuperNodeSettings(superlink="srv:8000", data_path=tmp_path / "x",
                                            insecure=True))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClientSetupError, match="no image files"):
        supernode_command(SuperNodeSettings(superlink="srv:8000", data_path=tmp_path / "empty",
                                            insecure=True))
    assert "--insecure" in supernode_command(SuperNodeSettings(
        superlink="srv:8000", data_path=images, insecure=True))
    kept = supernode_command(SuperNodeSettings(superlink="srv:8000", data_path=images, insecure=True,
                                               state_dir=tmp_path / "state"))
    assert kept[kept.index("--node-config") + 1].endswith(f' state-dir="{tmp_path / "state"}"')
    from fedssl.client import supernode
    from fedssl.common import folders
    assert supernode.IMAGE_EXTENSIONS == folders.IMAGE_EXTENSIONS


# ----------------------------------------------------------------- real deployment, loopback


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A TLS SuperLink with site authentication; site0, site1 and `broken` registered,
    `rogue` not. Every process is stopped at the end, whatever the tests did."""
    root = tmp_path_factory.mktemp("deploy")
    dep = LoopbackDeployment(root, ["site0", "site1", "broken", "rogue"])
    try:
        dep.start_server()
        for site in ("site0", "site1", "broken"):
            dep.register(site)
        yield dep
    finally:
        dep.stop()


@pytest.fixture(scope="module")
def finished_run(deployment, tmp_path_factory):
    """Two sites with their own image folders and a third whose folder is gone; a 2-round
    run started with `flwr run . CONNECTION`."""
    root = tmp_path_factory.mktemp("sites")
    for i in (0, 1):
        deployment.start_site(f"site{i}", write_image_folder(root / f"site{i}", per_class=4, seed=i + 1))
    deployment.start_site("broken", root / "vanished", raw=True)
    deployment.wait_online(3)
    eval_folder = write_image_folder(root / "eval", per_class=6, seed=9)
    out = deployment.root / "server-runs" / "run"
    values = dict(dataset="imagefolder", data_path=str(eval_folder), eval_path=str(eval_folder),
                  num_rounds=2, out_dir=str(out), threads=1, **TINY)
    cfg = RunConfig(**values)
    proc = deployment.run(run_config(values))
    return deployment, proc, out, cfg


def run_config(values: dict) -> str:
    """`flwr run --run-config` syntax: strings quoted, booleans lower case."""
    return " ".join(f"{k.replace('_', '-')}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
                    for k, v in values.items())


@pytest.mark.engine
def test_two_rounds_over_tls_with_site_auth(finished_run):
    deployment, proc, out, cfg = finished_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["clients_ok"] for r in rows[1:]] == [2, 2]
    initial = build_method(cfg).shared_state()
    state, meta = load_weights(out / "checkpoint.safetensors")
    assert meta["round"] == 2 and set(state) == set(initial)
    assert any(not torch.equal(state[k], initial[k]) for k in initial if k.startswith("encoder."))
    method = build_method(cfg)
    method.load_partial(state)  # the checkpoint loads into the method it came from
    # the SuperLink kept its state and its log where `fedssl server` said
    assert (deployment.workdir / "state" / "superlink.db").stat().st_size > 0
    assert "Activated node_id" in (deployment.workdir / "logs" / "superlink.log").read_text()


@pytest.mark.engine
def test_a_site_without_its_images_fails_clearly_and_the_run_goes_on(finished_run):
    deployment, proc, out, _ = finished_run
    assert proc.returncode == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_failed"] for r in rows[1:]] == [1, 1]
    assert all("does not exist" in next(iter(r["failures"].values())) for r in rows[1:])
    log = deployment.procs.log("broken")
    assert "DataError" in log and "vanished' does not exist" in log


@pytest.mark.engine
@pytest.mark.parametrize("privacy, rounds", [(dict(secure_aggregation=True, secagg_threshold=2), 1),
                                             (dict(dp="fixed", dp_clip_norm=1.0, dp_noise_multiplier=0.1), 2)],
                         ids=["secagg+", "dp"])
def test_privacy_modes_run_at_the_sites_with_no_site_setting(finished_run, privacy, rounds):
    """The sites started for a plain run serve SecAgg+ and DP runs too; the site without its
    images drops out of each round and the others' updates are still aggregated. DP runs two
    rounds, so its accountant composes two releases. SecAgg+ runs one round here (four
    message stages a site, each seconds of work at a real site); tests/test_privacy.py runs
    SecAgg+ over several rounds in-process, with dropouts."""
    deployment, _, plain_out, cfg = finished_run
    out = plain_out.parent / next(iter(privacy))
    values = dict(dataset="imagefolder", data_path=cfg.data_path, eval_path=cfg.eval_path,
                  num_rounds=rounds, out_dir=str(out), threads=1, max_update_norm_ratio=0, **TINY, **privacy)
    proc = deployment.run(run_config(values))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients_ok"], r["clients_failed"]) for r in rows] == \
        [(0, 0, 0)] + [(r, 2, 1) for r in range(1, rounds + 1)]
    initial = build_method(RunConfig(**values)).shared_state()
    state, _ = load_weights(out / "checkpoint.safetensors")
    assert any(not torch.equal(state[k], initial[k]) for k in initial if k.startswith("encoder."))
    report = json.loads((out / "summary.json").read_text())["privacy"]
    if "dp" in privacy:
        assert report["dp"] == "fixed" and report["releases"] == 2 and report["epsilon"] > 0
    else:
        assert report["secure_aggregation"] is True and report["threshold"] == 2


@pytest.mark.engine
@pytest.mark.parametrize("method", ["vicreg", "barlowtwins", "dino", "swav", "mae"])
def test_the_newer_families_train_at_the_sites(finished_run, method):
    """Each family issue 19 added runs at real sites as the first ones do: one round, both
    sites' updates aggregated, the shared encoder moved. DINO keeps a teacher and a centre at
    the site; MAE trains its own ViT on one view; SwAV normalises its averaged prototypes."""
    deployment, _, plain_out, cfg = finished_run
    out = plain_out.parent / method
    values = dict(dataset="imagefolder", data_path=cfg.data_path, eval_path=cfg.eval_path,
                  method=method, num_rounds=1, out_dir=str(out), threads=1, **TINY)
    proc = deployment.run(run_config(values))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients_ok"]) for r in rows] == [(0, 0), (1, 2)]
    initial = build_method(RunConfig(**values)).shared_state()
    state, meta = load_weights(out / "checkpoint.safetensors")
    assert meta["method"] == method and set(state) == set(initial)
    assert any(not torch.equal(state[k], initial[k]) for k in initial if k.startswith("encoder."))


@pytest.mark.engine
def test_an_unregistered_site_is_refused(deployment, image_folder):
    proc = deployment.start_site("rogue", image_folder, max_wait=5)
    assert proc.wait(timeout=60) != 0
    log = deployment.procs.log("rogue")
    assert "Failed to activate SuperNode" in log and "SuperNode ID" not in log


@pytest.mark.engine
def test_a_plaintext_site_cannot_talk_to_the_tls_server(deployment, image_folder):
    online = deployment.online()
    start = time.monotonic()
    proc = deployment.start_site("site0", image_folder, insecure=True, max_wait=5, name="plain")
    assert proc.wait(timeout=60) != 0 and time.monotonic() - start >= 5
    log = deployment.procs.log("plain")
    assert "Connection attempt failed" in log and "SuperNode ID" not in log
    assert deployment.online() <= online


def test_processes_are_stopped_also_on_failure(tmp_path):
    from fedssl.simulations.loopback import Processes
    procs = Processes(tmp_path)
    sleeper = procs.start("sleeper", ["sleep", "300"], env={"PATH": "/usr/bin:/bin"})
    try:
        raise RuntimeError("a test failed")
    except RuntimeError:
        pass
    finally:
        procs.stop()
    assert sleeper.poll() is not None and (tmp_path / "sleeper.log").exists()
