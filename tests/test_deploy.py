"""The systemd unit and EnvironmentFile that `pi-axera-sd install-service` renders."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pi_axera_sd_service import deploy
from pi_axera_sd_service.settings import Settings, settings_flags


@pytest.fixture()
def layout(tmp_path: Path) -> dict[str, Path]:
    """A venv-like folder with an executable pi-axera-sd, a checkout, and the env file."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    launcher = venv / "bin" / "pi-axera-sd"
    launcher.write_text("#!/bin/sh\nexit 0\n")
    launcher.chmod(0o755)
    work = tmp_path / "checkout"
    work.mkdir()
    env_file = tmp_path / "pi_axera_sd_generator.env"
    env_file.write_text("PORT=5000\n")
    return {
        "venv": venv,
        "workdir": work,
        "env_file": env_file,
        "output_dir": work / "out",
        "state_dir": work / "state",
    }


def _directives(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_unit_has_the_lines_the_service_needs(layout):
    unit = deploy.render_unit(user="pi", shutdown_timeout=30.0, **layout)
    d = _directives(unit)
    assert "{{" not in unit and "}}" not in unit
    assert d["Type"] == ["simple"]
    assert d["User"] == ["pi"]
    assert d["WorkingDirectory"] == [str(layout["workdir"])]
    assert d["EnvironmentFile"] == [str(layout["env_file"])]
    assert d["ExecStart"] == [f"{layout['venv']}/bin/pi-axera-sd serve"]
    env = dict(v.split("=", 1) for v in d["Environment"])
    assert env["PYTHONUNBUFFERED"] == "1"
    assert "/usr/lib/axcl" in env["LD_LIBRARY_PATH"].split(":")
    assert d["Restart"] == ["on-failure"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["PrivateTmp"] == ["yes"]
    assert set(d["ReadWritePaths"][0].split()) == {str(layout["output_dir"]), str(layout["state_dir"])}
    assert "PrivateDevices" not in d, "PrivateDevices hides /dev/axcl_host from the service"
    assert d["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("shutdown_timeout", [30.0, 100.0, 2.5])
def test_systemd_waits_longer_than_the_graceful_shutdown(layout, shutdown_timeout):
    unit = deploy.render_unit(user="pi", shutdown_timeout=shutdown_timeout, **layout)
    (stop,) = _directives(unit)["TimeoutStopSec"]
    assert int(stop) > shutdown_timeout


def test_relative_dirs_become_absolute(layout, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = {**layout, "output_dir": Path("out"), "state_dir": Path("state")}
    (rw,) = _directives(deploy.render_unit(user="pi", **layout))["ReadWritePaths"]
    assert set(rw.split()) == {str(tmp_path / "out"), str(tmp_path / "state")}


@pytest.mark.parametrize("bad", [{"user": "pi; rm"}, {"workdir": Path("/srv/my models")}])
def test_unit_refuses_values_that_would_break_it(layout, bad):
    with pytest.raises(ValueError):
        deploy.render_unit(**{**layout, "user": "pi", **bad})


def _analyze(unit_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(unit_path)], capture_output=True, text=True, timeout=30
    )


def test_systemd_analyze_verify_accepts_the_unit(layout, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    probe = tmp_path / "probe.service"
    probe.write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    if _analyze(probe).returncode != 0:
        pytest.skip(
            f"systemd-analyze cannot verify units here (container?): {_analyze(probe).stderr.strip()}"
        )
    unit_path = tmp_path / "pi_axera_sd_generator.service"
    unit_path.write_text(deploy.render_unit(user="root", **layout))
    result = _analyze(unit_path)
    # verify exits 0 even for unknown keys and unparsable values; it only warns, so read the warnings too
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_analyze_catches_a_missing_launcher(layout, tmp_path):
    """The verify check above is meaningful: a venv without pi-axera-sd fails it."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    unit_path = tmp_path / "pi_axera_sd_generator.service"
    unit_path.write_text(deploy.render_unit(user="root", **{**layout, "venv": tmp_path / "nowhere"}))
    result = _analyze(unit_path)
    if "not executable" not in result.stderr and result.returncode == 0:
        pytest.skip("systemd-analyze here does not check ExecStart")
    assert result.returncode != 0


def _read_env_file(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        if value.startswith('"'):
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        values[key] = value
    return values


def test_env_file_lists_every_setting_and_configures_settings(tmp_path, monkeypatch):
    text = deploy.render_env_file(
        model_dir=tmp_path / "models",
        output_dir=tmp_path / "out",
        state_dir=tmp_path / "state",
        host="0.0.0.0",
        port=7860,
        extra={"api_auth": 'alice:pa ss"w', "strict": True},
    )
    for flag in settings_flags():
        assert re.search(rf"^#?{flag.env}=", text, re.M), f"{flag.env} missing from the env file"
    values = _read_env_file(text)
    for key in [f.env for f in settings_flags()]:
        monkeypatch.delenv(key, raising=False)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert (s.host, s.port, s.strict) == ("0.0.0.0", 7860, True)
    assert s.api_auth == 'alice:pa ss"w'
    assert s.model_dir == tmp_path / "models"
    assert s.output_dir == tmp_path / "out"
    assert s.state_dir == tmp_path / "state"
    assert s.cache_dir == tmp_path / "state" / "cache", "the cache must live in a ReadWritePaths dir"
    assert s.log_json is False, "settings not chosen stay at their defaults (commented out)"


def test_env_file_rejects_unknown_settings():
    with pytest.raises(ValueError, match="nope"):
        deploy.render_env_file(extra={"nope": 1})


def _install_argv(layout, user: str, env_file) -> list[str]:
    """install-service arguments for the test layout's venv and checkout."""
    return ["--venv", str(layout["venv"]), "--workdir", str(layout["workdir"]), "--user", user,
            "--env-file", str(env_file)]


def test_cli_writes_unit_and_env(layout, tmp_path, capsys):
    out = tmp_path / "unit.service"
    argv = [*_install_argv(layout, "pi", layout["env_file"]), "--shutdown-timeout", "60"]
    assert deploy.main([*argv, "--output", str(out)]) == 0
    expected = deploy.render_unit(
        layout["venv"],
        "pi",
        layout["workdir"],
        layout["env_file"],
        layout["workdir"] / "txt2img_server_output",
        layout["workdir"] / "state",
        60.0,
    )
    assert out.read_text() == expected
    capsys.readouterr()
    assert deploy.main([*argv, "--print-env", "--port", "5123"]) == 0
    env = _read_env_file(capsys.readouterr().out)
    assert env["PORT"] == "5123"
    assert env["SHUTDOWN_TIMEOUT"] == "60.0"
    assert env["MODEL_DIR"] == str(layout["workdir"] / "models")


def test_cli_install_writes_files_and_keeps_existing_settings(layout, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("--install needs root")
    unit_dir = tmp_path / "systemd"
    env_file = tmp_path / "etc" / "pi_axera_sd_generator"
    argv = [*_install_argv(layout, "root", env_file), "--install", "--unit-dir", str(unit_dir),
            "--no-daemon-reload"]
    assert deploy.main(argv) == 0
    unit = (unit_dir / "pi_axera_sd_generator.service").read_text()
    assert f"EnvironmentFile={env_file}" in unit
    assert (layout["workdir"] / "state" / "cache").is_dir()
    assert (layout["workdir"] / "txt2img_server_output").is_dir()
    assert env_file.stat().st_mode & 0o777 == 0o640, "the env file may hold API_AUTH credentials"
    env_file.write_text("PORT=6000\n")
    assert deploy.main(argv) == 0
    assert env_file.read_text() == "PORT=6000\n", "a second install must not overwrite the user's settings"


def test_cli_install_refuses_unknown_user(layout, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("--install needs root")
    argv = [
        "--venv",
        str(layout["venv"]),
        "--user",
        "no_such_user_x",
        "--install",
        "--unit-dir",
        str(tmp_path),
        "--no-daemon-reload",
        "--env-file",
        str(tmp_path / "env"),
    ]
    assert deploy.main(argv) == 2
    assert not (tmp_path / "pi_axera_sd_generator.service").exists()


def test_bad_arguments_are_one_line_naming_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        deploy.main(["--port", "70000", "--workdir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--port: must be a port number 1..65535, got '70000'" in capsys.readouterr().err
    assert deploy.main(["--user", "bad user", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "pi-axera-sd install-service: error: user name 'bad user' is not a valid account name"
