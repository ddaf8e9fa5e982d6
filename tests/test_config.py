"""Configuration is validated before any port opens, and errors name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from gateway.errors import ConfigError


def check_config(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_valid_config(tmp_path: Path):
    res = check_config(tmp_path, '[gateway]\ndomains = ["cabinet-dupont.fr"]\n'
                                 '[next_hop]\naddress = "10.0.0.5:25"\n')
    assert res.returncode == 0, res.stderr
    assert "configuration valide" in res.stdout


@pytest.mark.parametrize(("text", "named"), [
    ('[gateway]\ndomains = ["a.fr"]\n[smtp]\nlisten_port = 25\n', "smtp.listen_port : clé inconnue"),
    ('[gateway]\ndomains = ["a.fr"]\n[smtp]\nmax_recipients = "many"\n', "smtp.max_recipients"),
    ('[gateway]\ndomains = ["a.fr"]\n[scoring]\ntag = 9\nquarantine = 5\n', "scoring : les seuils"),
    ('[gateway]\ndomains = []\n', "gateway.domains"),
    ('[gateway]\ndomains = ["a.fr"]\n[next_hop]\naddress = "mailhost"\n', "next_hop.address"),
    ('[gateway]\ndomains = ["a.fr"]\n[next_hop]\nstarttls = "maybe"\n', "next_hop.starttls"),
    ('[gateway]\ndomains = ["a.fr"]\n[dns]\nnameservers = ["resolver"]\n', "dns.nameservers[0]"),
    ('[gateway]\ndomains = ["a.fr"]\n[smtp]\ntls_cert = "/nonexistent.pem"\n', "smtp.tls_cert"),
    ('[gateway\n', "TOML invalide"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, named: str):
    res = check_config(tmp_path, text)
    assert res.returncode == 2
    assert named in res.stderr, res.stderr


def test_key_file_with_loose_mode_is_refused(tmp_path: Path):
    key = tmp_path / "q.key"
    key.write_text("00" * 32)
    key.chmod(0o644)
    with pytest.raises(ConfigError) as exc:
        config.build({"gateway": {"domains": ["a.fr"]}, "quarantine": {"key_file": str(key)}})
    assert f"le fichier de clé {key} a le mode 0644 ; 0600 attendu" in str(exc.value)


def test_command_line_overrides(tmp_path: Path):
    cfg = config.load(None)
    cfg = config.override(cfg, gateway__domains=("b.fr",), next_hop__address="127.0.0.1:2526",
                          dns__nameservers=("127.0.0.1:5353",), gateway__data_dir=str(tmp_path))
    assert cfg.domains == frozenset({"b.fr"})
    assert cfg.next_hop_address is not None and cfg.next_hop_address.port == 2526
    assert config.nameservers(cfg) == [("127.0.0.1", 5353)]
    with pytest.raises(ConfigError, match="smtp.listen"):
        config.override(cfg, smtp__listen="nowhere")


def test_container_environment_sets_the_practice_keys_over_the_file(tmp_path: Path):
    """The image's file has no domain: the container's environment gives it (docker/README)."""
    image_file = Path(__file__).resolve().parents[1] / "docker" / "container.toml"
    with pytest.raises(ConfigError, match="gateway.domains : il faut au moins un domaine"):
        config.load(image_file, environ={})
    env = {"GATEWAY_DOMAINS": "cabinet-dupont.fr, msp-dupont.fr",
           "GATEWAY_HOSTNAME": "mx.cabinet-dupont.fr", "GATEWAY_NEXT_HOP": "10.0.0.5:25",
           "GATEWAY_PUBLIC_URL": "https://passerelle.cabinet-dupont.fr:8443",
           "GATEWAY_NOT_A_KEY": "ignored"}
    cfg = config.load(image_file, environ=env)
    assert cfg.domains == frozenset({"cabinet-dupont.fr", "msp-dupont.fr"})
    assert cfg.gateway.hostname == "mx.cabinet-dupont.fr"
    assert str(cfg.next_hop_address) == "10.0.0.5:25"
    assert cfg.web.public_url == "https://passerelle.cabinet-dupont.fr:8443"
    assert str(cfg.listen) == "0.0.0.0:25" and cfg.gateway.data_dir == "/var/lib/gateway"
    # Over a file that has them too, and over the embedded default; empty counts as unset.
    own = tmp_path / "gateway.toml"
    own.write_text('[gateway]\ndomains = ["ancien.fr"]\nhostname = "mx.ancien.fr"\n')
    cfg = config.load(own, environ={"GATEWAY_DOMAINS": "nouveau.fr", "GATEWAY_HOSTNAME": ""})
    assert cfg.domains == frozenset({"nouveau.fr"}) and cfg.gateway.hostname == "mx.ancien.fr"
    assert config.load(None, environ={"GATEWAY_DOMAINS": "a.fr"}).domains == frozenset({"a.fr"})
    # A bad value is named, with where it came from.
    with pytest.raises(ConfigError) as exc:
        config.load(own, environ={"GATEWAY_NEXT_HOP": "boite-aux-lettres"})
    assert "next_hop.address" in str(exc.value)
    assert "variables d'environnement (GATEWAY_NEXT_HOP)" in str(exc.value)


def test_front_proxy_lists_never_name_everyone_and_urls_carry_no_control_characters():
    for key in ("proxy_protocol_hosts", "xclient_hosts"):
        for everyone in ("0.0.0.0/0", "::/0"):
            with pytest.raises(ConfigError, match=f"smtp.{key}\\[0\\] : .* tout Internet"):
                config.build({"gateway": {"domains": ["a.fr"]}, "smtp": {key: [everyone]}})
    with pytest.raises(ConfigError, match="web.public_url : une adresse web sans espace"):
        config.load(None, environ={"GATEWAY_PUBLIC_URL": "https://x.fr/\r\nBcc: a@b.fr"})


def test_example_config_is_valid():
    example = Path(__file__).resolve().parents[1] / "docker" / "gateway.example.toml"
    cfg = config.load(example)
    assert cfg.domains == frozenset({"cabinet-dupont.fr"})
    assert str(cfg.next_hop_address) == "10.0.0.5:25"


def test_check_config_also_checks_the_rules(tmp_path: Path):
    import shutil
    rules = tmp_path / "rules"
    shutil.copytree(Path(__file__).resolve().parents[1] / "rules", rules)
    (rules / "senders" / "local.toml").write_text(
        '[[organisation]]\nid = "ch-exemple"\nname = "le CH d\'Exemple"\n'
        'domains = ["ch-exemple.fr"]\ncolour = "bleu"\n')
    res = check_config(tmp_path, f'[gateway]\ndomains = ["a.fr"]\nrules_dir = "{rules}"\n')
    assert res.returncode == 2
    assert "local.toml: organisation[0]: unknown key(s) colour" in res.stderr
    (rules / "senders" / "local.toml").write_text(
        '[[organisation]]\nid = "ch-exemple"\nname = "le CH d\'Exemple"\n'
        'domains = ["ch-exemple.fr"]\nnames = ["CH d\'Exemple"]\n')
    res = check_config(tmp_path, f'[gateway]\ndomains = ["a.fr"]\nrules_dir = "{rules}"\n')
    assert res.returncode == 0, res.stderr


def test_a_broken_rules_file_is_named(tmp_path: Path):
    import shutil
    rules = tmp_path / "rules"
    shutil.copytree(Path(__file__).resolve().parents[1] / "rules", rules)
    (rules / "lures.toml").write_text("lures = [\n")
    res = check_config(tmp_path, f'[gateway]\ndomains = ["a.fr"]\nrules_dir = "{rules}"\n')
    assert res.returncode == 2
    assert f"{rules / 'lures.toml'} : TOML invalide" in res.stderr
    assert "Traceback" not in res.stderr


def test_web_page_beyond_loopback_needs_https(tmp_path):
    from gateway import config as cfgmod
    from gateway.errors import ConfigError as Err
    base = {"gateway": {"domains": ["a.fr"], "data_dir": str(tmp_path)}}
    with pytest.raises(Err, match="web.listen : une page web joignable au-delà de cette machine exige HTTPS"):
        cfgmod.build({**base, "web": {"listen": "0.0.0.0:8080"}})
    cfgmod.build({**base, "web": {"listen": "127.0.0.1:8080"}})
    cfgmod.build({**base, "web": {"listen": ""}})


def test_the_environment_turns_the_engines_on(tmp_path: Path):
    """docker/compose.yaml's engine profiles set these: each turns its engine on."""
    secret = tmp_path / "rspamd-password"
    secret.write_text("x\n")
    secret.chmod(0o600)
    cfg = config.load(None, environ={
        "GATEWAY_CLAMAV": "clamav:3310", "GATEWAY_RSPAMD": "http://rspamd:11333",
        "GATEWAY_RSPAMD_CONTROLLER": "http://rspamd:11334",
        "GATEWAY_RSPAMD_PASSWORD_FILE": str(secret)})
    assert cfg.engines.clamav.enabled and cfg.engines.clamav.address == "clamav:3310"
    r = cfg.engines.rspamd
    assert r.enabled and r.url == "http://rspamd:11333"
    assert r.controller_url == "http://rspamd:11334" and r.password_file == str(secret)
    off = config.load(None, environ={})
    assert not off.engines.clamav.enabled and not off.engines.rspamd.enabled
    with pytest.raises(ConfigError, match="engines.clamav.address"):
        config.load(None, environ={"GATEWAY_CLAMAV": "clamav"})
