"""The command line as a user runs it: pi-axera-sd subcommands and the upstream-style scripts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pi_axera_sd_service.cli import build_parser, settings_from_args, with_demo_fallback
from pi_axera_sd_service.runtime.demo_pack import demo_pack_dir
from pi_axera_sd_service.settings import Settings, settings_flags

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ("sd15_text_encoder_sim.onnx", "unet.onnx", "vae_decoder.onnx", "vae_encoder.onnx")
MODEL_ENV = ("MODEL_DIR", "TEXT_MODEL_DIR", "TEXT_ENCODER_MODEL", "UNET_MODEL", "VAE_DECODER_MODEL",
             "VAE_ENCODER_MODEL", "TIME_INPUT_TXT2IMG", "BACKEND", "DEMO", "CACHE_DIR")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the demo pack, generated once per session."""
    folder = tmp_path_factory.mktemp("cache")
    demo_pack_dir(folder)
    return folder


@pytest.fixture(scope="session")
def pack(cache_dir: Path) -> Path:
    return demo_pack_dir(cache_dir)


def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python <args>` with the test interpreter, no model settings inherited, wide help output."""
    env = {k: v for k, v in os.environ.items() if k not in MODEL_ENV}
    env["COLUMNS"] = "250"
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=120)


def cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run("-m", "pi_axera_sd_service", *args, cwd=cwd)


def assert_clean_error(proc: subprocess.CompletedProcess[str]) -> None:
    """Non-zero exit, a message on stderr, and no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip()


def test_check_models_on_demo_pack_prints_one_ok_line_per_model(pack: Path) -> None:
    proc = cli("check-models", pack)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in MODEL_FILES:
        matching = [line for line in lines if name in line]
        assert len(matching) == 1, (name, proc.stdout)
        assert "OK" in matching[0], matching[0]


def test_check_models_names_the_missing_file(pack: Path, tmp_path: Path) -> None:
    broken = tmp_path / "models"
    shutil.copytree(pack, broken)
    (broken / "unet.onnx").unlink()
    proc = cli("check-models", broken)
    assert_clean_error(proc)
    assert "unet" in proc.stdout + proc.stderr


def test_check_models_on_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    proc = cli("check-models", tmp_path / "nowhere")
    assert_clean_error(proc)
    assert "nowhere" in proc.stdout + proc.stderr


def test_generate_demo_writes_a_reproducible_png(cache_dir: Path, tmp_path: Path) -> None:
    outputs = []
    for name, seed in (("a.png", "7"), ("b.png", "7"), ("c.png", "8")):
        out = tmp_path / name
        proc = cli("generate", "--demo", "--cache-dir", cache_dir, "--prompt", "a red fox in the snow",
                   "--seed", seed, "--output", out)
        assert proc.returncode == 0, proc.stderr
        assert f"seed: {seed}" in proc.stdout and str(out) in proc.stdout
        assert "unet" in proc.stdout  # per-stage timings
        outputs.append(out.read_bytes())
    with Image.open(tmp_path / "a.png") as img:
        assert (img.format, img.size) == ("PNG", (512, 512))
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_generate_img2img_uses_the_init_image(cache_dir: Path, tmp_path: Path) -> None:
    results = []
    for colour in ("red", "blue"):
        init = tmp_path / f"{colour}.png"
        Image.new("RGB", (300, 200), colour).save(init)
        out = tmp_path / f"out-{colour}.png"
        proc = cli("generate", "--demo", "--cache-dir", cache_dir, "--prompt", "a cat", "--seed", "3",
                   "--init-image", init, "--denoising-strength", "0.5", "--output", out)
        assert proc.returncode == 0, proc.stderr
        assert "img2img" in proc.stdout
        results.append(out.read_bytes())
    assert results[0] != results[1]


def test_generate_rejects_bad_arguments_without_traceback(cache_dir: Path, tmp_path: Path) -> None:
    proc = cli("generate", "--demo", "--cache-dir", cache_dir, "--prompt", "x", "--steps", "9", "--strict",
               "--output", tmp_path / "x.png")
    assert_clean_error(proc)
    assert "--steps" in proc.stderr and "strict" in proc.stderr
    proc = cli("generate", "--demo", "--cache-dir", cache_dir, "--prompt", "x",
               "--init-image", tmp_path / "missing.png", "--output", tmp_path / "x.png")
    assert_clean_error(proc)
    assert "missing.png" in proc.stderr


def test_upstream_scripts_run_on_the_demo_pack(cache_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CACHE_DIR": str(cache_dir)}  # the scripts keep upstream flags; the cache is env
    for script, out in (("run_txt2img.py", tmp_path / "x.png"), ("run_img2img.py", tmp_path / "y.png")):
        proc = subprocess.run(
            [sys.executable, ROOT / "python" / script, "--demo", "--seed", "1", "--save_dir", out],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "seed: 1" in proc.stdout
        with Image.open(out) as img:
            assert (img.format, img.size) == ("PNG", (512, 512))


def test_upstream_script_without_models_names_what_is_missing(tmp_path: Path) -> None:
    proc = run(ROOT / "python" / "run_txt2img.py", "--save_dir", tmp_path / "x.png", cwd=tmp_path)
    assert_clean_error(proc)
    assert "models" in proc.stderr


def test_make_demo_models_writes_a_pack_that_checks_ok(tmp_path: Path) -> None:
    folder = tmp_path / "pack"
    proc = cli("make-demo-models", folder)
    assert proc.returncode == 0, proc.stderr
    for relative in ("tokenizer/vocab.json", "tokenizer/merges.txt",
                     "text_encoder/sd15_text_encoder_sim.onnx", "unet.onnx", "vae_decoder.onnx",
                     "vae_encoder.onnx", "time_input_txt2img.npy"):
        assert (folder / relative).is_file(), relative
    as_script = ROOT / "pi_axera_sd_service" / "pi_axera_sd_generator.py"  # how the upstream unit runs it
    assert run(as_script, "check-models", folder).returncode == 0


def test_serve_help_lists_every_setting_with_its_env_name() -> None:
    proc = cli("serve", "--help")
    assert proc.returncode == 0
    for flag in settings_flags():
        assert flag.flag in proc.stdout and flag.env in proc.stdout, flag


def test_flags_override_the_environment_only_when_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "6001")
    monkeypatch.setenv("STRICT", "true")
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["serve"])).port == 6001
    settings = settings_from_args(parser.parse_args(["serve", "--port", "7002", "--no-strict"]))
    assert (settings.port, settings.strict) == (7002, False)


def test_serve_falls_back_to_the_demo_pack_only_without_models(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_dir: Path, pack: Path
) -> None:
    for name in MODEL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no ./models here
    assert with_demo_fallback(Settings(cache_dir=cache_dir)).demo is True
    configured = Settings(cache_dir=cache_dir, model_dir=tmp_path / "elsewhere")
    assert with_demo_fallback(configured).demo is False  # a configured path is never silently replaced
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "unet.axmodel").write_bytes(b"partial install")
    assert with_demo_fallback(Settings(cache_dir=cache_dir)).demo is False  # loading names what is missing
    shutil.rmtree(tmp_path / "models")
    shutil.copytree(pack, tmp_path / "models")
    assert with_demo_fallback(Settings(cache_dir=cache_dir)).demo is False


def test_invalid_setting_value_is_one_line(tmp_path: Path) -> None:
    proc = cli("check-models", "--device-id", "x", tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr  # argparse usage error
    env = {**os.environ, "DEVICE_ID": "x"}
    env_proc = subprocess.run([sys.executable, "-m", "pi_axera_sd_service", "check-models", tmp_path],
                              capture_output=True, text=True, env=env, timeout=60)
    assert_clean_error(env_proc)
    assert "DEVICE_ID / --device-id" in env_proc.stderr and "'x'" in env_proc.stderr


def test_install_service_renders_a_unit_for_this_venv(tmp_path: Path) -> None:
    proc = cli("install-service", "--user", "pi", "--workdir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"ExecStart={Path(sys.prefix).absolute()}/bin/pi-axera-sd serve" in proc.stdout
    assert "User=pi" in proc.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_bare_script_serves_the_demo_pack_when_no_models_exist(cache_dir: Path, tmp_path: Path) -> None:
    """The README's first command: no subcommand means serve; an empty folder falls back to the demo."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in MODEL_ENV}
    proc = subprocess.Popen(
        [sys.executable, ROOT / "pi_axera_sd_service" / "pi_axera_sd_generator.py", "--port", str(port),
         "--cache-dir", cache_dir, "--state-dir", tmp_path / "state"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        health = None
        deadline = time.monotonic() + 60  # bounds a hang: start-up is slow on a loaded machine
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    health = json.load(response)
                break
            except OSError:
                time.sleep(0.2)
        assert health is not None, "server did not answer /health"
        assert health["backend"] == "onnxruntime"
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "serving the demo pack" in output


def test_readme_commands_and_links_are_real() -> None:
    """The README's test command is what CI runs, and every relative link points at a file."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = "scripts/install.sh && .venv/bin/python -m pytest -q"
    assert command in readme and command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "scripts/install.sh && .venv/bin/pi-axera-sd serve" in readme
    missing = [target for target in re.findall(r"\]\(([^)#\s:]+)(?:#[^)]*)?\)", readme)
               if not (ROOT / target).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_links_every_document() -> None:
    """A newcomer finds every document from the README."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    docs = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "docs").glob("*.md"))]
    docs += ["RASPBERRY_PI_SETUP.md", "models/README.md", "bench/README.md", "compat_tests/README.md"]
    unlinked = [doc for doc in docs if f"]({doc})" not in readme]
    assert not unlinked, f"README does not link {unlinked}"


TIMING_LINE = re.compile(r"^  (\S+)\s+[\d.]+ ms$")


def _stages(stdout: str) -> list[str]:
    return [m.group(1) for line in stdout.splitlines() if (m := TIMING_LINE.match(line))]


def test_generate_prints_the_stage_timings_in_pipeline_order(cache_dir: Path, tmp_path: Path) -> None:
    proc = cli("generate", "--demo", "--cache-dir", cache_dir, "--prompt", "a fox", "--seed", "1",
               "--steps", "3", "--output", tmp_path / "t.png")
    assert proc.returncode == 0, proc.stderr
    assert _stages(proc.stdout) == ["load_models", "text", "unet_step_1", "unet_step_2", "unet_step_3",
                                    "unet_total", "vae_decode", "image_encode", "total"]
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), "green").save(init)
    proc = cli("generate", "--demo", "--cache-dir", cache_dir, "--prompt", "a fox", "--seed", "1",
               "--init-image", init, "--denoising-strength", "0.5", "--output", tmp_path / "i.png")
    assert proc.returncode == 0, proc.stderr
    assert _stages(proc.stdout) == ["load_models", "text", "vae_encode", "unet_step_1", "unet_step_2",
                                    "unet_total", "vae_decode", "image_encode", "total"]


@pytest.mark.parametrize(("flags", "body", "guidance"), [
    ((), {}, "on"),
    (("--cfg-scale", "7", "--steps", "20", "--negative-prompt", "fog"),
     {"cfg_scale": 7, "steps": 20, "negative_prompt": "fog"}, "on"),
    (("--cfg-scale", "7", "--steps", "20"), {"cfg_scale": 7, "steps": 20}, "off"),
])
def test_generate_and_the_service_make_the_same_image(
    cache_dir: Path, tmp_path: Path, flags: tuple[str, ...], body: dict[str, Any], guidance: str
) -> None:
    """One code path: `generate --demo` and POST /generate on the same pack give identical pixels,
    warnings and infotext, clamps (cfg 7 -> 2, steps 20 -> 8 on the demo pack's time table) and GUIDANCE=off
    included."""
    import base64
    import io

    import numpy as np
    from fastapi.testclient import TestClient

    from pi_axera_sd_service.api.app import create_app
    from pi_axera_sd_service.service.engine import Engine

    out = tmp_path / "cli.png"
    proc = cli("generate", "--demo", "--cache-dir", cache_dir, "--seed", "5", "--prompt", "a red barn",
               "--guidance", guidance, *flags, "--output", out)
    assert proc.returncode == 0, proc.stderr
    cli_warnings = [line.removeprefix("warning: ") for line in proc.stdout.splitlines()
                    if line.startswith("warning: ")]
    settings = Settings(demo=True, backend="onnxruntime", cache_dir=cache_dir, state_dir=tmp_path / "state",
                        output_dir=tmp_path / "out", api_auth=None, guidance=guidance)
    engine = Engine(settings)
    engine.start()
    with TestClient(create_app(settings, engine)) as client:
        response = client.post("/generate", json={"mode": "txt2img", "prompt": "a red barn", "seed": 5,
                                                   **body})
    assert response.status_code == 200, response.text
    served_png = base64.b64decode(response.json()["base64"])
    with Image.open(io.BytesIO(served_png)) as served, Image.open(out) as mine:
        assert np.array_equal(np.asarray(served), np.asarray(mine))
        assert served.info["parameters"] == mine.info["parameters"]
        infotext = mine.info["parameters"]
    assert response.json()["warnings"] == cli_warnings
    if body:  # the clamps the service applies, now in the CLI's file too
        assert "Steps: 8," in infotext and any("steps 20" in w for w in cli_warnings)
        cfg = "2.0" if guidance == "on" else "1.0"
        assert f"CFG scale: {cfg}," in infotext and any("cfg_scale 7" in w for w in cli_warnings)


@pytest.mark.parametrize("value", ["abc", "70000", "-1"])
def test_bad_environment_value_names_the_variable(tmp_path: Path, value: str) -> None:
    env = {**os.environ, "PORT": value}
    proc = subprocess.run([sys.executable, "-m", "pi_axera_sd_service", "serve", "--demo"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert_clean_error(proc)
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "PORT / --port" in proc.stderr and value in proc.stderr


def test_undecodable_init_image_names_the_file(cache_dir: Path, tmp_path: Path) -> None:
    init = tmp_path / "notes.png"
    init.write_text("not an image")
    proc = cli("generate", "--demo", "--cache-dir", cache_dir, "--prompt", "x", "--init-image", init,
               "--output", tmp_path / "x.png")
    assert_clean_error(proc)
    assert str(init) in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_serve_on_a_port_in_use_is_one_clear_line(cache_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli("serve", "--demo", "--cache-dir", cache_dir, "--port", str(port),
                   "--state-dir", tmp_path / "state", cwd=tmp_path)
    assert_clean_error(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], proc.stderr


def _script_args(name: str, argv: list[str]) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "python" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return vars(module.get_args(argv))


def test_upstream_scripts_keep_the_upstream_flags_and_defaults() -> None:
    """Upstream run_txt2img_axe_infer.py / run_img2img_axe_infer.py: same flag names and defaults
    (model files default to ./models)."""
    txt = _script_args("run_txt2img", [])
    assert txt["prompt"] == "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k"
    assert (txt["text_model_dir"], txt["save_dir"]) == ("./models/", "./txt2img_output_axe.png")
    assert txt["seed"] == -1
    assert {"unet_model", "vae_decoder_model", "time_input", "backend", "demo"} <= set(txt)
    img = _script_args("run_img2img", [])
    assert img["prompt"] == "Astronauts in a jungle, cold color palette, muted colors, detailed, 8k"
    assert (img["save_dir"], img["seed"], img["denoising_strength"]) == ("./img2img_output_axe.png", 0, 0.5)
    assert {"vae_encoder_model", "init_image"} <= set(img)
    assert _script_args("run_img2img", ["--backend", "axe"])["backend"] == "axe"
