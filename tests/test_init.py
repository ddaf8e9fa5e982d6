"""`gateway init`: a first configuration, its data folder, and the settings to make elsewhere;
the CLI says which configuration and data folder it used when it finds nothing."""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from gateway import cli, config, install


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def test_init_writes_a_checked_configuration_and_a_private_data_folder(tmp_path: Path, capsys,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    conf = tmp_path / "etc" / "gateway.toml"
    umask = os.umask(0o022)
    status, out, err = run(capsys, "init", "--domaine", "cabinet-dupont.fr", "--domaine",
                           "msp-dupont.fr", "--serveur-messagerie", "10.0.0.5:25",
                           "--donnees", "donnees", "--fichier", str(conf))
    assert os.umask(umask) == 0o022  # the calling process's umask is left as it was
    assert status == 0, err
    cfg = config.load(conf)
    assert cfg.data_dir == tmp_path / "donnees" and cfg.data_dir.is_absolute()
    assert f'data_dir = "{tmp_path / "donnees"}"' in conf.read_text()  # absolute in the file
    assert cfg.domains == {"cabinet-dupont.fr", "msp-dupont.fr"}
    assert cfg.gateway.hostname == "mx.cabinet-dupont.fr" and cfg.next_hop.address == "10.0.0.5:25"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    assert stat.S_IMODE(cfg.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(cfg.key_file.stat().st_mode) == 0o600
    # What to set elsewhere: the MX of each domain, the mailbox server's door, the next steps.
    assert "cabinet-dupont.fr.  MX  10 mx.cabinet-dupont.fr." in out
    assert "msp-dupont.fr.  MX  10 mx.cabinet-dupont.fr." in out
    assert "n'acceptez sur son port 25 que la passerelle" in out
    assert f"gateway serve --config {conf}" in out
    assert str(cfg.key_file) in out and "sauvegarder" in out
    # The file `serve` would load, rules included.
    assert run(capsys, "check-config", str(conf))[0] == 0

    # Never over an existing file without --forcer; nothing left behind when refused.
    before = conf.read_text()
    status, _, err = run(capsys, "init", "--domaine", "autre.fr", "--fichier", str(conf),
                         "--donnees", "donnees")
    assert status == 2 and "existe déjà" in err and err.startswith("Initialisation impossible")
    assert conf.read_text() == before
    status, _, err = run(capsys, "init", "--domaine", "autre.fr", "--fichier", str(conf),
                         "--donnees", "donnees", "--forcer")
    assert status == 0 and config.load(conf).domains == {"autre.fr"}


def test_init_refuses_a_bad_answer_and_leaves_no_file(tmp_path: Path, capsys):
    conf = tmp_path / "gateway.toml"
    status, _, err = run(capsys, "init", "--domaine", "cabinet.fr", "--serveur-messagerie",
                         "pas une adresse", "--fichier", str(conf), "--donnees",
                         str(tmp_path / "d"))
    assert status == 2 and err.startswith("Initialisation impossible")
    assert "next_hop.address" in err
    assert not conf.exists() and not list(tmp_path.glob(".*.tmp"))
    status, _, err = run(capsys, "init", "--fichier", str(conf))  # no domain, no terminal
    assert status == 2 and "--domaine" in err and not conf.exists()


def test_init_asks_at_a_terminal(tmp_path: Path):
    asked: list[str] = []
    replies = iter(["cabinet-martin.fr, annexe-martin.fr", "", "192.0.2.10:25"])

    def read(prompt: str) -> str:
        asked.append(prompt)
        return next(replies)

    class Flags:
        data_dir = str(tmp_path / "d")

    a = install.answers_from(Flags(), interactive=True, read=read)
    assert a.domains == ("cabinet-martin.fr", "annexe-martin.fr")
    assert a.hostname == "mx.cabinet-martin.fr"  # the default offered, taken
    assert a.next_hop == "192.0.2.10:25"
    assert len(asked) == 3 and "[mx.cabinet-martin.fr]" in asked[1]


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the folder to an account needs root")
def test_init_gives_the_data_folder_to_the_service_account(tmp_path: Path, capsys):
    conf = tmp_path / "gateway.toml"
    status, _, err = run(capsys, "init", "--domaine", "cabinet.fr", "--compte", "nobody",
                         "--fichier", str(conf), "--donnees", str(tmp_path / "d"))
    assert status == 0, err
    nobody = pwd.getpwnam("nobody")
    for path in (tmp_path / "d", tmp_path / "d" / "quarantine.key",
                 *(tmp_path / "d").rglob("*")):
        assert path.stat().st_uid == nobody.pw_uid, path
    assert conf.stat().st_uid == 0 and conf.stat().st_gid == nobody.pw_gid
    # Again over a folder where the account left a link to a file of root's: not followed.
    secret = tmp_path / "root-only"
    secret.write_text("x")
    (tmp_path / "d" / "lien").symlink_to(secret)
    status, _, err = run(capsys, "init", "--domaine", "cabinet.fr", "--compte", "nobody",
                         "--fichier", str(conf), "--donnees", str(tmp_path / "d"), "--forcer")
    assert status == 0, err
    assert secret.stat().st_uid == 0
    status, _, err = run(capsys, "init", "--domaine", "cabinet.fr", "--compte", "personne-ici",
                         "--fichier", str(tmp_path / "g2.toml"), "--donnees",
                         str(tmp_path / "d2"))
    assert status == 2 and "n'existe pas" in err


def test_the_cli_says_which_configuration_and_data_it_used_when_it_finds_nothing(
        tmp_path: Path, capsys, monkeypatch):
    conf = tmp_path / "gateway.toml"
    assert run(capsys, "init", "--domaine", "cabinet.fr", "--fichier", str(conf),
               "--donnees", str(tmp_path / "d"))[0] == 0
    status, out, _ = run(capsys, "quarantine", "--config", str(conf), "list")
    assert status == 0
    assert out.strip() == (f"Aucun message en quarantaine. (configuration : {conf} ; "
                           f"données : {tmp_path / 'd'})")
    monkeypatch.setenv("GATEWAY_CONFIG", str(conf))  # the same, found by the environment
    status, out, _ = run(capsys, "track", "introuvable")
    assert status == 1 and f"(configuration : {conf} ; données : {tmp_path / 'd'})" in out


def test_init_checks_every_answer_before_writing_anything(tmp_path: Path, capsys, monkeypatch):
    conf = tmp_path / "gateway.toml"
    data = str(tmp_path / "d")
    for argv, why in (
            (["--domaine", "cabinet.fr", "--nom", "mx.cabinet.fr\r\n250 forged"], "pas un nom DNS"),
            (["--domaine", "cabinet.fr", "--compte", "compte-inconnu"], "n'existe pas"),
            (["--domaine", "cabinet.fr", "--nom", "mx\udcff.fr"], "UTF-8")):
        status, _, err = run(capsys, "init", *argv, "--fichier", str(conf), "--donnees", data)
        assert status == 2 and why in err, err
        assert not conf.exists() and not (tmp_path / "d").exists()
        assert not list(tmp_path.glob(".*"))  # no temporary file either
    # Domains given as one comma-separated flag are several domains.
    monkeypatch.setenv("GATEWAY_CONFIG", str(conf))  # and --fichier defaults to it
    status, _, err = run(capsys, "init", "--domaine", "a-cabinet.fr, b-cabinet.fr",
                         "--donnees", data)
    assert status == 0, err
    assert config.load(conf).domains == {"a-cabinet.fr", "b-cabinet.fr"}


def test_init_file_stays_readable_by_the_service(tmp_path: Path, capsys):
    conf = tmp_path / "gateway.toml"
    umask = os.umask(0o077)  # a hardened host's
    try:
        assert run(capsys, "init", "--domaine", "cabinet.fr", "--fichier", str(conf),
                   "--donnees", str(tmp_path / "var" / "lib" / "d"))[0] == 0
    finally:
        os.umask(umask)
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    # The data folder's parents, made by init, can be crossed by the service's account.
    for parent in (tmp_path / "var", tmp_path / "var" / "lib"):
        assert stat.S_IMODE(parent.stat().st_mode) == 0o755, parent
    if os.geteuid() == 0:
        os.chown(conf, 0, 65534)
        assert run(capsys, "init", "--domaine", "cabinet.fr", "--fichier", str(conf),
                   "--donnees", str(tmp_path / "d2"), "--forcer")[0] == 0
        assert conf.stat().st_gid == 65534  # replaced, still the service's group


@pytest.mark.skipif(os.geteuid() != 0, reason="giving the folder to an account needs root")
def test_init_refuses_a_data_folder_another_account_could_redirect(tmp_path: Path, capsys):
    elsewhere = tmp_path / "etc-like"
    elsewhere.mkdir()
    link = tmp_path / "data-link"
    link.symlink_to(elsewhere)
    status, _, err = run(capsys, "init", "--domaine", "cabinet.fr", "--compte", "nobody",
                         "--fichier", str(tmp_path / "g.toml"), "--donnees", str(link))
    assert status == 2 and "est un lien" in err and not list(elsewhere.iterdir())
    shared = tmp_path / "partage"
    shared.mkdir()
    os.chown(shared, 65534, 65534)  # the service's account owns a parent folder
    status, _, err = run(capsys, "init", "--domaine", "cabinet.fr", "--compte", "nobody",
                         "--fichier", str(tmp_path / "g.toml"), "--donnees",
                         str(shared / "data"))
    assert status == 2 and "peut être modifié par un autre compte" in err
    assert not (shared / "data").exists()


def test_a_system_configuration_is_found_unless_the_environment_says_otherwise(
        tmp_path: Path, monkeypatch):
    import argparse
    system = tmp_path / "gateway.toml"
    system.write_text('[gateway]\ndomains = ["cabinet.fr"]\n')
    monkeypatch.setattr(install, "DEFAULT_FILE", system)
    none = argparse.Namespace(config=None)
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    assert cli.config_path(none) == system
    monkeypatch.setenv("GATEWAY_CONFIG", "")  # make run, the tests: the embedded default
    assert cli.config_path(none) is None
    assert cli.config_path(argparse.Namespace(config="/x.toml")) == Path("/x.toml")


def test_configuration_file_errors_are_french(tmp_path: Path, capsys):
    bad = tmp_path / "casse.toml"
    bad.write_text('[gateway\ndomains = ["a.fr"]\n')
    unclosed = tmp_path / "ouvert.toml"
    unclosed.write_text('[gateway]\ndomains = ["a.fr"\n')
    for target, why in ((tmp_path, "est un dossier"),
                        (bad, "TOML invalide (ligne 1, colonne 9)"),
                        (unclosed, "TOML invalide (fin du fichier atteinte")):
        status, _, err = run(capsys, "check-config", str(target))
        assert status == 2 and why in err and "Expected" not in err, err
    status, _, err = run(capsys, "quarantine", "--config", str(tmp_path), "list")
    assert status == 2 and "est un dossier" in err


def test_purge_refuses_a_period_that_would_remove_everything(tmp_path: Path, capsys):
    conf = tmp_path / "gateway.toml"
    assert run(capsys, "init", "--domaine", "cabinet.fr", "--fichier", str(conf),
               "--donnees", str(tmp_path / "d"))[0] == 0
    for days in ("0", "-1", "nan"):
        status, _, err = run(capsys, "quarantine", "--config", str(conf), "purge",
                             "--days", days)
        assert status == 2 and "au moins 1" in err
