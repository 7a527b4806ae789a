"""`pi-axera-sd install-service`: render the systemd unit and its EnvironmentFile, optionally install them."""

from __future__ import annotations

import argparse
import getpass
import math
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from .exit_codes import CONFIG_EXIT_CODES
from .settings import settings_flags

SERVICE_NAME = "pi_axera_sd_generator"
TEMPLATE_PATH = Path(__file__).with_name(f"{SERVICE_NAME}.service")
DEFAULT_ENV_FILE = Path(f"/etc/default/{SERVICE_NAME}")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
GRACE_AFTER_SHUTDOWN_S = 10  # api/server.py lets uvicorn wait shutdown_timeout + 10 s for an interrupted job
STOP_MARGIN_S = 10  # then the engine and the process still have to exit
_TOKEN = re.compile(r"\{\{([a-z_]+)\}\}")
PROG = "pi-axera-sd install-service"


def stop_timeout(shutdown_timeout: float) -> int:
    """TimeoutStopSec: longer than the service's own longest shutdown, whole seconds."""
    return int(math.ceil(shutdown_timeout)) + GRACE_AFTER_SHUTDOWN_S + STOP_MARGIN_S


def _fill(template: str, values: dict[str, str]) -> str:
    def sub(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"unit template field {{{{{key}}}}} has no value")
        return values[key]

    return _TOKEN.sub(sub, template)


def _unit_path(path: Path) -> str:
    """Absolute path as systemd wants it; refuse characters a unit line cannot hold."""
    text = str(Path(path).absolute())
    if any(c in text for c in ("\n", " ", "%", "\\", '"')):
        raise ValueError(f"path {text!r} contains a space, %, quote or backslash; choose a simpler path")
    return text


def render_unit(
    venv: Path,
    user: str,
    workdir: Path,
    env_file: Path,
    output_dir: Path,
    state_dir: Path,
    shutdown_timeout: float = 30.0,
) -> str:
    """The unit file text for this venv, user and paths (from the packaged template)."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", user):
        raise ValueError(f"user name {user!r} is not a valid account name")
    body = TEMPLATE_PATH.read_text(encoding="utf-8")
    body = body[body.index("[Unit]") :]  # drop the template's own header comment
    rw = sorted({_unit_path(output_dir), _unit_path(state_dir)})
    text = _fill(
        body,
        {
            "venv": _unit_path(venv),
            "user": user,
            "workdir": _unit_path(workdir),
            "env_file": _unit_path(env_file),
            "read_write_paths": " ".join(rw),
            "shutdown_timeout": f"{shutdown_timeout:g}",
            "timeout_stop_sec": str(stop_timeout(shutdown_timeout)),
            "restart_prevent_exit_status": " ".join(str(code) for code in CONFIG_EXIT_CODES),
        },
    )
    header = (
        f"# {SERVICE_NAME}.service, rendered by `pi-axera-sd install-service`.\n"
        f"# Settings: {_unit_path(env_file)}. Re-render after moving the venv or the checkout.\n\n"
    )
    return header + text


def _env_value(value: Any) -> str:
    """A value as an EnvironmentFile line holds it (double quotes when needed)."""
    text = ("true" if value else "false") if isinstance(value, bool) else str(value)
    if text and re.fullmatch(r"[A-Za-z0-9_./:,@+=-]+", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_env_file(
    model_dir: Path | None = None,
    output_dir: Path | None = None,
    state_dir: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 5000,
    shutdown_timeout: float = 30.0,
    extra: dict[str, Any] | None = None,
) -> str:
    """EnvironmentFile text: the given settings set, every other one commented out at its default.

    `extra` maps setting names (e.g. "api_auth") to values. The model-hash cache goes under the state
    dir, because the unit makes everything else read-only.
    """
    chosen: dict[str, Any] = {"host": host, "port": port, "shutdown_timeout": shutdown_timeout}
    if model_dir is not None:
        chosen["model_dir"] = Path(model_dir).absolute()
    if output_dir is not None:
        chosen["output_dir"] = Path(output_dir).absolute()
    if state_dir is not None:
        chosen["state_dir"] = Path(state_dir).absolute()
        chosen["cache_dir"] = Path(state_dir).absolute() / "cache"
    known = {flag.field for flag in settings_flags()}
    for key, value in (extra or {}).items():
        if key not in known:
            raise ValueError(f"unknown setting {key!r}")
        chosen[key] = value
    lines = [
        f"# Settings of {SERVICE_NAME} (read by systemd's EnvironmentFile=).",
        "# One NAME=value per line; uncomment a line to change it, then:",
        f"#   sudo systemctl restart {SERVICE_NAME}",
        "# docs/configuration.md describes every setting.",
        "",
    ]
    for flag in settings_flags():
        lines.append(f"# {flag.description}")
        if flag.field in chosen and chosen[flag.field] is not None:
            lines.append(f"{flag.env}={_env_value(chosen[flag.field])}")
        else:
            default = "" if flag.default is None else _env_value(flag.default)
            lines.append(f"#{flag.env}={default}")
    return "\n".join(lines) + "\n"


def _default_user() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _port(text: str) -> int:
    """argparse type: a TCP port, as Settings.port accepts it."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 1..65535, got {text!r}")
    return port


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=f"Render the systemd unit {SERVICE_NAME}.service for this venv, user and checkout.",
    )
    p.add_argument("--user", default=None, help="account the service runs as (default: $SUDO_USER or you)")
    p.add_argument(
        "--venv", type=Path, default=Path(sys.prefix), help="venv holding pi-axera-sd (default: this one)"
    )
    p.add_argument("--workdir", type=Path, default=Path.cwd(), help="working directory (default: current)")
    p.add_argument(
        "--env-file", type=Path, default=DEFAULT_ENV_FILE, help=f"settings file (default {DEFAULT_ENV_FILE})"
    )
    p.add_argument("--model-dir", type=Path, default=None, help="MODEL_DIR (default: <workdir>/models)")
    p.add_argument(
        "--output-dir", type=Path, default=None, help="OUTPUT_DIR (default: <workdir>/txt2img_server_output)"
    )
    p.add_argument("--state-dir", type=Path, default=None, help="STATE_DIR (default: <workdir>/state)")
    p.add_argument(
        "--host", default="127.0.0.1", help="HOST (0.0.0.0 to serve the network; set API_AUTH then)"
    )
    p.add_argument("--port", type=_port, default=5000, help="PORT (1..65535)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, help="SHUTDOWN_TIMEOUT in seconds")
    p.add_argument("--output", type=Path, default=None, help="write the unit here instead of stdout")
    p.add_argument("--print-env", action="store_true", help="print the EnvironmentFile instead of the unit")
    p.add_argument(
        "--install",
        action="store_true",
        help="(root) write the unit to /etc/systemd/system, the env file if missing, create the "
        "output/state dirs, and run systemctl daemon-reload",
    )
    p.add_argument("--unit-dir", type=Path, default=DEFAULT_UNIT_DIR, help=argparse.SUPPRESS)
    p.add_argument("--no-daemon-reload", action="store_true", help=argparse.SUPPRESS)
    return p


def _install(args: argparse.Namespace, unit: str, env: str, output_dir: Path, state_dir: Path) -> int:
    if os.geteuid() != 0:
        print(
            f"{PROG}: error: --install needs root; run it with sudo (or use --output and copy the file)",
            file=sys.stderr,
        )
        return 2
    try:
        account = pwd.getpwnam(args.user)
    except KeyError:
        print(f"{PROG}: error: user {args.user!r} does not exist", file=sys.stderr)
        return 2
    for folder in (output_dir, state_dir, state_dir / "cache"):
        folder.mkdir(parents=True, exist_ok=True)
        os.chown(folder, account.pw_uid, account.pw_gid)
    env_file = args.env_file
    if env_file.exists():
        print(f"kept existing settings file {env_file} (delete it to get a fresh one)")
    else:
        env_file.parent.mkdir(parents=True, exist_ok=True)
        env_file.write_text(env, encoding="utf-8")
        env_file.chmod(0o640)  # may hold API_AUTH credentials
        os.chown(env_file, 0, account.pw_gid)
        print(f"wrote settings file {env_file}")
    args.unit_dir.mkdir(parents=True, exist_ok=True)
    unit_path = args.unit_dir / f"{SERVICE_NAME}.service"
    unit_path.write_text(unit, encoding="utf-8")
    unit_path.chmod(0o644)
    print(f"wrote {unit_path}")
    if not args.no_daemon_reload:
        systemctl = shutil.which("systemctl")
        result = subprocess.run([systemctl, "daemon-reload"], check=False) if systemctl else None
        if result is None or result.returncode != 0:
            print(
                f"{PROG}: error: `systemctl daemon-reload` failed; run it yourself once systemd is up",
                file=sys.stderr,
            )
            return 1
    print(f"next: sudo systemctl enable --now {SERVICE_NAME} && journalctl -u {SERVICE_NAME} -f")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry of `install-service`; returns the exit status."""
    args = _parser().parse_args(argv)
    args.user = args.user or _default_user()
    workdir = args.workdir.absolute()
    output_dir = (args.output_dir or workdir / "txt2img_server_output").absolute()
    state_dir = (args.state_dir or workdir / "state").absolute()
    model_dir = (args.model_dir or workdir / "models").absolute()
    launcher = args.venv / "bin" / "pi-axera-sd"
    if not launcher.exists():
        print(f"{PROG}: warning: {launcher} does not exist; is --venv the venv you installed into?",
              file=sys.stderr)
    if args.user == "root":
        print(f"{PROG}: warning: the service would run as root; pass --user <your login>", file=sys.stderr)
    try:
        unit = render_unit(
            args.venv, args.user, workdir, args.env_file, output_dir, state_dir, args.shutdown_timeout
        )
    except ValueError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    env = render_env_file(model_dir, output_dir, state_dir, args.host, args.port, args.shutdown_timeout)
    if args.install:
        return _install(args, unit, env, output_dir, state_dir)
    text = env if args.print_env else unit
    if args.output:
        args.output.write_text(text, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if not args.print_env and not args.output:
        print(
            f"# install: sudo {shlex.quote(str(launcher))} install-service --install --user {args.user}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
