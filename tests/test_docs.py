"""The documents cannot drift from the code: generated docs, quoted error messages, routes, links."""

from __future__ import annotations

import importlib.util
import re
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
