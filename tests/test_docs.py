"""The documents cannot drift from the code: generated docs, quoted error messages, routes, links."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pi_axera_sd_service.settings import settings_flags

ROOT = Path(__file__).resolve().parents[1]
SETUP = ROOT / "RASPBERRY_PI_SETUP.md"
SOURCE_DIR = ROOT / "pi_axera_sd_service"


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_docs"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gen_docs():
    return _gen_docs()


@pytest.mark.parametrize("name", ["configuration", "capabilities"])
def test_generated_doc_matches_its_generator(gen_docs, name):
    path, generate = gen_docs.GENERATORS[name]
    assert path.read_text(encoding="utf-8") == generate(), f"{path.name} is stale: run scripts/gen_docs.py"


def test_check_mode_fails_on_a_stale_doc(gen_docs, tmp_path, monkeypatch, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration\n\nold text\n")
    monkeypatch.setattr(gen_docs, "ROOT", tmp_path)
    monkeypatch.setattr(gen_docs, "GENERATORS", {"configuration": (stale, gen_docs.configuration_md)})
    assert gen_docs.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert stale.read_text() == "# Configuration\n\nold text\n", "--check must not rewrite"
    assert gen_docs.main([]) == 0
    assert gen_docs.main(["--check"]) == 0


def test_configuration_lists_every_setting_with_env_and_flag():
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for flag in settings_flags():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{flag.field}` |")), None)
        assert row is not None, f"{flag.field} missing from configuration.md"
        assert f"`{flag.env}`" in row and f"`{flag.flag}`" in row


def test_capabilities_doc_shows_every_row_of_the_live_table(gen_docs, tmp_path):
    table = gen_docs._capability_table(tmp_path).to_dict()
    text = (ROOT / "docs" / "capabilities.md").read_text(encoding="utf-8")
    for row in table["rows"]:
        assert f"| `{row['field']}` |" in text


# --------------------------------------------------------------------------- troubleshooting


def _troubleshooting_messages() -> list[str]:
    """The start-up messages quoted in the troubleshooting table (first column, in backticks)."""
    text = SETUP.read_text(encoding="utf-8")
    section = text.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    messages = []
    for line in section.splitlines():
        if line.startswith("| `"):
            messages.append(re.match(r"\| `([^`]+)`", line).group(1))
    return messages


def _source_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(SOURCE_DIR.rglob("*.py")))


def test_troubleshooting_table_quotes_messages_the_service_really_prints():
    messages = _troubleshooting_messages()
    assert len(messages) >= 5, "missing library, model I/O, missing file, port in use, device busy"
    source = _source_text()
    for message in messages:
        for piece in [p for p in re.split(r"<[^>]+>", message) if p.strip()]:
            assert piece.strip() in source, f"{piece.strip()!r} (from {message!r}) is not in the source"


def test_no_card_step_installs_the_board_library():
    """Card users need libaxcl_rt.so only; the upstream guide told them to install libax_engine.so."""
    text = SETUP.read_text(encoding="utf-8")
    card = text.split("### Path A", 1)[1].split("### Path B", 1)[0]
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", card, re.S))
    assert "libaxcl_rt" in card and "/dev/axcl_host" in card and "axcl-smi" in card
    assert "libax_engine" not in commands and "ax_engine" not in commands


# --------------------------------------------------------------------------- links and routes


@pytest.mark.parametrize(
    "doc", ["RASPBERRY_PI_SETUP.md", "docs/api.md", "docs/fleet.md", "docs/feature_discovery.md"]
)
def test_relative_links_resolve(doc):
    path = ROOT / doc
    if not path.exists():
        pytest.fail(f"{doc} is missing")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{doc} links to missing {target}"


API_BASE = "localhost:5000"


def _api_doc() -> str:
    return (ROOT / "docs" / "api.md").read_text(encoding="utf-8")


def test_api_doc_shows_every_example_command(gen_docs):
    text = _api_doc()
    for ex in gen_docs._examples():
        if ex.get("shown", True):
            assert gen_docs._curl(ex, API_BASE) in text, f"docs/api.md lacks the {ex['name']} example"


def test_api_doc_statuses_match_the_running_service(gen_docs):
    """Each example in docs/api.md is followed by the HTTP status a demo-pack server returns now."""
    captured = gen_docs.capture_examples()
    text = _api_doc()
    heads = re.findall(r"<!-- example (\w+): HTTP (\d+), \d+ ms -->", captured)
    assert len(heads) == len(gen_docs._examples())
    for (name, status), ex in zip(heads, gen_docs._examples(), strict=True):
        assert name == ex["name"]
        if not ex.get("shown", True):
            continue
        command = gen_docs._curl(ex, API_BASE)
        after = text[text.index(command) + len(command) :]
        shown = re.search(r"HTTP (\d+)", after).group(1)
        assert shown == status, f"docs/api.md: HTTP {shown} for {ex['name']}; the service answers {status}"


def test_api_doc_covers_every_route():
    """Every method + path the app serves has a `### `METHOD /path`` heading in docs/api.md."""
    from pi_axera_sd_service.api.app import create_app
    from pi_axera_sd_service.settings import Settings

    paths = create_app(Settings.model_construct()).openapi()["paths"]
    served = {f"{method.upper()} {path}" for path, ops in paths.items() for method in ops}
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    documented = set()
    for heading in re.findall(r"^#+ (.*)$", text, re.M):
        for method, path in re.findall(r"`((?:GET|POST)(?:/POST)?) (/[^` ]*)`", heading):
            documented.update(f"{m} {path}" for m in method.split("/"))
    missing = sorted(served - documented)
    assert not missing, f"routes without a heading in docs/api.md: {missing}"
    assert not sorted(documented - served), "docs/api.md documents routes the app does not serve"


# --------------------------------------------------------------------------- the Pi path, verbatim


def _bash_blocks(text: str) -> list[str]:
    """The ```bash blocks of a markdown text, continuation lines joined."""
    return [block.replace("\\\n", " ") for block in re.findall(r"```bash\n(.*?)```", text, re.S)]


def _setup_section(number: int) -> str:
    return SETUP.read_text(encoding="utf-8").split(f"\n## {number}. ", 1)[1].split("\n## ", 1)[0]


# the model files the service loads on the Pi (models/README.md), and files it must not fetch
PI_MODEL_FILES = ["models/unet.axmodel", "models/vae_decoder.axmodel", "models/vae_encoder.axmodel",
                  "models/text_encoder/sd15_text_encoder_sim.axmodel", "models/tokenizer/vocab.json",
                  "models/tokenizer/merges.txt", "models/time_input_txt2img.npy"]
CPU_ONLY_FILES = ["models/unet.onnx", "models/text_encoder/sd15_text_encoder_sim.onnx"]


def _hf_download_params(line: str) -> dict:
    """One `hf download` command line parsed by the argument parser of the `hf` in the venv."""
    click = pytest.importorskip("click")
    hf_app = pytest.importorskip("huggingface_hub.cli.hf").app
    words = shlex.split(line)
    assert words[0] == ".venv/bin/hf" and words[1] == "download"
    root = click.Context(hf_app, info_name="hf")
    command = hf_app.get_command(root, "download")
    command = command.materialize() if hasattr(command, "materialize") else command
    params = command.make_context("download", words[2:], parent=root).params
    assert not params["filenames"], f"words taken as file names, not patterns: {params['filenames']}"
    return params


def test_model_download_command_selects_every_pi_file_by_the_installed_hf_parser():
    """Section 5's `hf download` line, parsed by the installed `hf` CLI (no network)."""
    from huggingface_hub.utils import filter_repo_objects

    lines = [line for block in _bash_blocks(_setup_section(5)) for line in block.splitlines()
             if "hf download AXERA-TECH/" in line]
    assert len(lines) == 1, "section 5 shows one hf download command for the published models"
    params = _hf_download_params(lines[0])
    assert params["repo_id"] == "AXERA-TECH/lcm-lora-sdv1-5"
    chosen = set(filter_repo_objects(PI_MODEL_FILES + CPU_ONLY_FILES, allow_patterns=list(params["include"])))
    assert chosen == set(PI_MODEL_FILES)
    assert params["local_dir"] and f"mv {params['local_dir']}/models/* models/" in _setup_section(5)


def test_every_hf_download_in_the_setup_guide_takes_each_pattern_as_a_pattern():
    """No `--include "a" "b"`: the installed `hf` takes only "a" as a pattern and "b" as a file name."""
    lines = [line for block in _bash_blocks(SETUP.read_text(encoding="utf-8")) for line in block.splitlines()
             if "hf download" in line]
    assert len(lines) >= 2
    for line in lines:
        assert _hf_download_params(line)["include"], line


def test_version_flag_prints_the_package_version(capsys):
    from importlib.metadata import version

    from pi_axera_sd_service.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"pi-axera-sd {version('pi_axera_sd_service')}\n"


def _stub_venv(checkout: Path, pip_lines: str, pip_status: int) -> None:
    """A copy of install.sh in `checkout` whose .venv python fakes `pip install` (prints `pip_lines`)."""
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "scripts" / "install.sh").write_bytes((ROOT / "scripts" / "install.sh").read_bytes())
    (checkout / "scripts" / "install.sh").chmod(0o755)
    (checkout / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    python = checkout / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"""#!/bin/sh
if [ "$1 $2" = "-m pip" ]; then printf '%s' '{pip_lines}'; echo 'pip: boom' >&2; exit {pip_status}; fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)


@pytest.mark.parametrize("pip_status", [0, 1])
def test_install_script_prints_a_line_per_package_and_fails_when_pip_fails(tmp_path, pip_status):
    pip_lines = "Collecting fastapi>=0.110\nRequirement already satisfied: numpy\nSuccessfully installed x\n"
    _stub_venv(tmp_path, pip_lines, pip_status)
    done = subprocess.run([str(tmp_path / "scripts" / "install.sh")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "install.sh: pip: Collecting fastapi>=0.110" in done.stderr
    assert "Requirement already" not in done.stderr + done.stdout
    assert "pip: boom" in done.stderr  # pip's errors pass through
    assert done.returncode == pip_status
    assert ("done:" in done.stderr) == (pip_status == 0)


# --------------------------------------------------------------------------- quoted facts

README = ROOT / "README.md"


def _format_patterns() -> list[re.Pattern[str]]:
    """Every string literal of the source as a pattern: %s / %d / {expr} match any text."""
    patterns = []
    for literal in set(re.findall(r"\"([^\"\n]{6,})\"", _source_text())):
        parts = re.split(r"%[-.\d]*[sdrf]|\{[^{}]*\}", literal)
        if len(parts) > 1:
            patterns.append(re.compile(".+?".join(re.escape(p) for p in parts)))
    return patterns


# messages the setup guide quotes outside the troubleshooting table (the service prints them)
SETUP_MESSAGES = [
    "all models OK",
    "N problem(s) found",
    "engine ready: unet on axengine (max_queue=16)",
    "cannot load the models: ...",
    "serving the demo pack on the CPU",
    "[FAIL] unet: models/unet.axmodel (axengine)",
    "model file not found: models/unet.axmodel",
]


@pytest.mark.parametrize("message", SETUP_MESSAGES)
def test_messages_quoted_in_the_setup_guide_are_printed_by_the_service(message):
    assert f"`{message}`" in " ".join(SETUP.read_text(encoding="utf-8").split())
    source = _source_text()
    assert message in source or any(p.fullmatch(message) for p in _format_patterns()), message


def test_check_models_output_shown_in_the_guide_is_what_the_demo_pack_prints(tmp_path, capsys):
    """Section 5's sample output, line by line in order, from the real command on a fresh demo pack."""
    from pi_axera_sd_service.cli import main

    section = _setup_section(5)
    shown = re.search(r"check-models /tmp/demo-pack\n```\n```\n(.*?)```", section, re.S).group(1)
    pack = tmp_path / "demo-pack"
    assert main(["make-demo-models", str(pack)]) == 0
    capsys.readouterr()
    assert main(["check-models", str(pack), "--backend", "auto"]) == 0
    printed = capsys.readouterr().out.replace(str(pack), "/tmp/demo-pack").splitlines()
    position = 0
    for line in shown.splitlines():
        assert line in printed[position:], f"not printed (in this order): {line!r}"
        position = printed.index(line, position) + 1


def test_img2img_step_counts_in_the_docs_are_what_the_scheduler_runs():
    from pi_axera_sd_service.pipeline.scheduler import img2img_timesteps

    readme = README.read_text(encoding="utf-8")
    strengths, counts = re.search(r"`denoising_strength` ([\d./]+) runs ([\d/]+) of the 4", readme).groups()
    for strength, count in zip(strengths.split("/"), counts.split("/"), strict=True):
        assert len(img2img_timesteps(float(strength), 4)) == int(count)
    rule = "⌊`denoising_strength` × `steps` + 0.5⌋ of them (halves round up; at least 1)"
    assert rule in readme and rule in " ".join(_setup_section(8).split())
    assert len(img2img_timesteps(0.5, 4)) == 2 and "2 of 4 at\n  strength 0.5" in _setup_section(8)
    for strength, steps in [(0.375, 4), (0.125, 4), (0.01, 3), (0.5, 3)]:  # halves up, at least 1
        assert len(img2img_timesteps(strength, steps)) == max(1, int(strength * steps + 0.5))


def test_readme_strict_statuses_are_what_the_service_answers(make_client, settings_factory):
    readme = " ".join(README.read_text(encoding="utf-8").split())
    sdapi, generate = re.search(r"`STRICT=true`, refuses it: (\d{3}) on `/sdapi`, and (\d{3}) "
                                r"`\{\"status\": \"error\"\}` on `/generate`", readme).groups()
    client = make_client(settings_factory(strict=True))
    assert str(client.post("/sdapi/v1/txt2img", json={"prompt": "p", "steps": 9}).status_code) == sdapi
    answer = client.post("/generate", json={"mode": "txt2img", "prompt": "p", "steps": 9})
    assert str(answer.status_code) == generate and answer.json()["status"] == "error"


def test_api_doc_quotes_the_warning_and_the_strict_refusal_the_service_gives(make_client, settings_factory):
    text = " ".join(_api_doc().split())
    warning, refusal = re.search(r"says what ran instead \(`([^`]+)`\).*?and what is supported \(`([^`]+)`\)",
                                 text).groups()
    body = {"mode": "txt2img", "prompt": "p", "steps": 9}
    assert make_client(settings_factory()).post("/generate", json=body).json()["warnings"] == [warning]
    strict = make_client(settings_factory(strict=True)).post("/sdapi/v1/txt2img", json=body)
    assert strict.status_code == 422 and strict.json()["detail"] == refusal


def test_readme_lists_every_flag_of_the_run_scripts():
    readme = README.read_text(encoding="utf-8")
    paragraph = readme.split("The upstream scripts' flags keep working", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"`(--\w+)`", paragraph))
    flags = set()
    for script in ("run_txt2img.py", "run_img2img.py"):
        shown = subprocess.run([sys.executable, str(ROOT / "python" / script), "--help"],
                               capture_output=True, text=True, timeout=120, check=True).stdout
        flags |= set(re.findall(r"(?<![\w-])(--\w+)", shown)) - {"--help"}
    assert listed == flags


def test_readme_quotes_the_version_line(capsys):
    from pi_axera_sd_service.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert f"(`{capsys.readouterr().out.strip()}`)" in README.read_text(encoding="utf-8")


def test_metrics_rejection_reasons_in_the_api_doc_are_the_ones_counted():
    text = " ".join(_api_doc().split("### `GET /metrics`", 1)[1].split("```", 1)[0].split())
    reasons = set(re.findall(r"`([a-z_]+)`", text.split("by reason:", 1)[1].split("Invalid requests", 1)[0]))
    source = _source_text()
    counted = set(re.findall(r"reject\(\"([a-z_]+)\"\)", source))
    counted |= set(re.findall(r"Error: \"([a-z_]+)\"", source))  # the engine's exception -> reason map
    counted |= set(re.findall(r"_refuse\(scope, send, \d+, \"([a-z_]+)\"", source))  # the body check
    assert reasons == counted


def test_metrics_ignore_invalid_requests(make_client, settings_factory):
    client = make_client(settings_factory())
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "p", "steps": "many"}).status_code == 422
    assert client.post("/generate", json={"mode": "paint"}).status_code == 400
    assert "sd_rejections_total{" not in client.get("/metrics").text


def test_fleet_doc_sends_credentials_to_every_protected_route():
    """Under API_AUTH only /health and /internal/ping are open (api/middleware.py OPEN_PATHS)."""
    from pi_axera_sd_service.api.middleware import OPEN_PATHS

    commands = [line for block in _bash_blocks((ROOT / "docs" / "fleet.md").read_text(encoding="utf-8"))
                for line in block.splitlines() if line.strip().startswith("curl")]
    assert commands
    for command in commands:
        path = re.search(r"https?://[^/\s]+(/[^\s'\"|]*)", command).group(1)
        assert path in OPEN_PATHS or " -u " in command, command


def test_no_file_cites_reference_documents_that_are_not_in_the_repository():
    cited = []
    for path in [*ROOT.glob("*.md"), *ROOT.glob("*/**/*.md"), *ROOT.rglob("*.py")]:
        if ".venv" in path.parts or "node_modules" in path.parts:
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        if re.search(r"\b(pipeline|webui_api|peers)\.md\b", text):
            cited.append(str(path.relative_to(ROOT)))
    assert cited == [path for path in cited if path == "tests/test_docs.py"]


def test_subcommand_help_describes_what_the_command_does(capsys):
    """check-models prints blocks, not "one line per model"; generate's --demo serves nothing."""
    from pi_axera_sd_service.cli import main

    for command in ("check-models", "generate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "one block per item" in shown and "one line per model" not in shown.lower()
    demo_help = re.findall(r"--demo, --no-demo (\w+)", shown)
    assert demo_help and "Serve" not in demo_help
