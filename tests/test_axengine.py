"""The axengine backend against tests/fake_axengine, a stand-in for pyaxengine 0.1.3 that behaves as
its source does (prints, device list, int64 refusal, __del__ noise, per-thread contexts) over
onnxruntime. First the stand-in itself, then the adapter in-process, then the CLI as a user runs it."""

from __future__ import annotations

import gc
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from fake_axengine.axmodels import axmodel_pack, copy_as_axmodel
from PIL import Image

from pi_axera_sd_service.exit_codes import EXIT_CONFIG
from pi_axera_sd_service.runtime import axengine_backend
from pi_axera_sd_service.runtime.checks import check_models
from pi_axera_sd_service.runtime.contract import AXMODEL_INPUT_IDS_RULE
from pi_axera_sd_service.runtime.model_dir import (
    count_devices,
    format_check_lines,
    load_models,
    resolve_model_files,
)
from pi_axera_sd_service.runtime.onnx_backend import OnnxSession
from pi_axera_sd_service.runtime.pyaxengine_output import _ThreadRoutedStdout, pyaxengine_output
from pi_axera_sd_service.runtime.session import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
FAKE_AXENGINE = Path(__file__).parent / "fake_axengine"

CARD = "AXCLRTExecutionProvider"
BOARD = "AxEngineExecutionProvider"
TEXT_ENCODER = "text_encoder/sd15_text_encoder_sim"
FAKE_ENV = ("FAKE_AXENGINE_PROVIDERS", "FAKE_AXCL_DEVICES", "FAKE_AXCL_FAIL", "FAKE_AXE_FAIL")
MODEL_ENV = ("MODEL_DIR", "TEXT_MODEL_DIR", "TEXT_ENCODER_MODEL", "UNET_MODEL", "VAE_DECODER_MODEL",
             "VAE_ENCODER_MODEL", "TIME_INPUT_TXT2IMG", "BACKEND", "DEMO", "DEVICE_ID", "LOG_LEVEL")


def _forget_axengine() -> None:
    for name in [n for n in sys.modules if n == "axengine" or n.startswith("axengine.")]:
        del sys.modules[name]
    axengine_backend.axengine_import_error.cache_clear()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ModuleType]]:
    """fake(providers=..., devices=..., fail=...) imports a fresh stand-in configured that way."""
    monkeypatch.syspath_prepend(str(FAKE_AXENGINE))

    def load(providers: str = CARD, devices: int = 1, fail: str | None = None, imported: bool = True
             ) -> ModuleType | None:
        """Configure the stand-in, import it and return the module (imported=False: leave the
        import to the code under test)."""
        _forget_axengine()
        monkeypatch.setenv("FAKE_AXENGINE_PROVIDERS", providers)
        monkeypatch.setenv("FAKE_AXCL_DEVICES", str(devices))
        if fail is None:
            monkeypatch.delenv("FAKE_AXCL_FAIL", raising=False)
        else:
            monkeypatch.setenv("FAKE_AXCL_FAIL", fail)
        if not imported:
            return None
        import axengine

        return axengine

    yield load
    _forget_axengine()


@pytest.fixture
def pack(demo_pack: Path, tmp_path: Path) -> Path:
    """A private demo pack with compiled `.axmodel` twins (int32 input_ids) next to the `.onnx` files."""
    return axmodel_pack(Path(shutil.copytree(demo_pack, tmp_path / "models")))


def open_fake(axengine: ModuleType, path: Path, device_id: int = 0, provider: str = CARD):
    options = [{"device_id": device_id}]
    return axengine.InferenceSession(str(path), providers=[provider], provider_options=options)


IDS = {"input_ids": np.arange(77, dtype=np.int32)[None]}


# --- the stand-in behaves as pyaxengine 0.1.3 ---------------------------------------------------------


def test_fake_prints_what_pyaxengine_prints(fake, pack: Path, capsys) -> None:
    axengine = fake(providers=f"{CARD},{BOARD}")
    assert capsys.readouterr().out == f"[INFO] Available providers:  ['{CARD}', '{BOARD}']\n"
    open_fake(axengine, pack / "unet.axmodel")
    assert capsys.readouterr().out.splitlines() == [
        f"[INFO] Using provider: {CARD}",
        "[INFO] SOC Name: AX650N",
        "[INFO] VNPU type: VNPUType.DISABLED",
        "[INFO] Compiler version: 0.0-fake onnxruntime",
    ]
    axengine.InferenceSession(str(pack / "unet.axmodel"), providers=["CUDAExecutionProvider", BOARD])
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [
        "[WARNING] Selected provider(s): ['CUDAExecutionProvider'] is(are) not available.",
        f"[INFO] Using provider: {BOARD}",
    ]
    assert "[INFO] Chip type: ChipType.MC50" in printed and printed[-1].startswith("[INFO] Compiler version")
    with pytest.raises(ValueError, match="is not available"):
        axengine.InferenceSession(str(pack / "unet.axmodel"), providers="CUDAExecutionProvider")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the noise it mirrors
def test_fake_device_list_and_out_of_range_index(fake, pack: Path) -> None:
    axengine = fake(devices=2)
    assert open_fake(axengine, pack / "unet.axmodel", device_id=1).get_providers() == CARD
    with pytest.raises(RuntimeError, match=r"^Device index 2 is out of range, total 2 device\.$"):
        open_fake(axengine, pack / "unet.axmodel", device_id=2)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the noise it mirrors
def test_fake_refuses_int64_inputs_at_session_creation(fake, pack: Path) -> None:
    axengine = fake()
    with pytest.raises(ValueError, match=r"^Unsupported data type '9'\.$"):
        open_fake(axengine, copy_as_axmodel(pack / f"{TEXT_ENCODER}.onnx"))


@pytest.mark.parametrize(("devices", "device_id", "error"), [(1, 1, TypeError), (1, 0, ValueError)])
def test_fake_failed_session_raises_from_del(fake, pack, monkeypatch, devices, device_id, error) -> None:
    """What Python prints as "Exception ignored in: <function AXCLRTSession.__del__ ...>"."""
    axengine = fake(devices=devices)
    model = pack / "unet.axmodel" if device_id else copy_as_axmodel(pack / f"{TEXT_ENCODER}.onnx")
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    try:
        open_fake(axengine, model, device_id=device_id)
    except (RuntimeError, ValueError) as exc:
        exc.__traceback__ = None
    gc.collect()
    assert [(u.exc_type, u.object.__qualname__) for u in seen] == [(error, "AXCLRTSession.__del__")]


def test_fake_run_restores_the_creating_threads_context(fake, pack: Path, monkeypatch) -> None:
    axengine = fake(devices=2)
    first = open_fake(axengine, pack / f"{TEXT_ENCODER}.axmodel", device_id=0)
    second = open_fake(axengine, pack / f"{TEXT_ENCODER}.axmodel", device_id=1)  # now current here

    def on_new_thread(session) -> object:
        result: list[object] = []

        def run() -> None:
            try:
                result.append(session.run(None, IDS)[0].shape)
            except RuntimeError as exc:
                result.append(str(exc))

        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        return result[0]

    assert first.run(None, IDS)[0].shape == (1, 77, 768)  # device 1's context was current: restored
    card = sys.modules["axengine._axcl_card"]
    device = card.current_context().device_id
    assert card.execute(device, lambda: card._locks[device].locked()) == (0, True)  # one run per card
    assert on_new_thread(second) == (1, 77, 768)  # a thread that never set a context
    monkeypatch.setattr(sys.modules["axengine._axclrt"], "RESTORE_CONTEXT_ON_RUN", False)
    assert str(on_new_thread(first)).startswith("axclrtEngineExecute failed 0x")
    with pytest.raises(RuntimeError, match="axclrtEngineExecute failed"):
        second.run(None, IDS)  # first.run above made device 0's context current on this thread


def test_fake_returns_fresh_arrays_and_asserts_dtype(fake, pack: Path) -> None:
    session = open_fake(fake(), pack / f"{TEXT_ENCODER}.axmodel")
    first, second = session.run(None, IDS)[0], session.run(None, IDS)[0]
    assert not np.shares_memory(first, second)
    first[:] = 0
    assert second.any()
    with pytest.raises(AssertionError, match=r"model inputs\(input_ids\) expect shape \[1, 77\]"):
        session.run(None, {"input_ids": IDS["input_ids"].astype(np.int64)})


@pytest.mark.parametrize(("fail", "error"), [("init", RuntimeError), ("dlopen", OSError)])
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the noise it mirrors
def test_fake_runtime_failure_comes_at_each_first_session(fake, pack: Path, fail, error) -> None:
    axengine = fake(fail=fail)  # the import works, as with pyaxengine
    for _ in range(2):  # a failed module import is retried (and fails again) by the next session
        with pytest.raises(error, match="Failed to initialize axcl runtime. -1.|cannot load library"):
            open_fake(axengine, pack / "unet.axmodel")


# --- the adapter: sessions, devices, prints, contract ---------------------------------------------


def test_axengine_end_to_end_with_device_and_int32_ids(fake, pack: Path, monkeypatch) -> None:
    card_node = pack / "axcl_host"
    card_node.touch()
    monkeypatch.setattr(axengine_backend, "AXCL_DEVICE_NODE", card_node)
    axengine = fake(providers=f"{BOARD},{CARD}", devices=4)
    files, backend = resolve_model_files(model_dir=pack)
    assert backend == "axengine" and files.unet.suffix == ".axmodel"
    models = load_models(files, backend, device_id=3)
    assert [c["provider"] for c in axengine.created] == [CARD] * 4
    assert all(c["provider_options"] == [{"device_id": 3}] for c in axengine.created)
    assert models.text_encoder.inputs[0].dtype == np.int32
    ids = np.arange(77, dtype=np.int64)[None]  # int64 as a tokenizer gives: cast to int32 on the way in
    on_npu = models.text_encoder.run({"input_ids": ids})[0]
    on_cpu = OnnxSession(pack / f"{TEXT_ENCODER}.onnx").run({"input_ids": ids})[0]
    np.testing.assert_array_equal(on_npu, on_cpu)
    names = models.unet_inputs
    feed = {
        names.sample: np.ones((1, 4, 64, 64), np.float64),  # float64 from numpy maths: cast, not asserted
        names.time: models.time_inputs[:1],
        names.context: on_npu,
    }
    assert models.unet.run(feed)[0].shape == (1, 4, 64, 64)


def test_board_provider_without_the_card_node_and_when_alone(fake, pack: Path, monkeypatch) -> None:
    # pyaxengine >= 0.1.3rc3: AXCLRT only when /dev/axcl_host exists (libaxcl_rt may be installed
    # on a board that has no card)
    monkeypatch.setattr(axengine_backend, "AXCL_DEVICE_NODE", pack / "no_such_device")
    fake(providers=f"{CARD},{BOARD}")
    assert axengine_backend.AxEngineSession(pack / "unet.axmodel").provider == BOARD
    fake(providers=CARD)
    assert axengine_backend.AxEngineSession(pack / "unet.axmodel").provider == CARD
    fake(providers=BOARD)
    assert count_devices("axengine") == 1  # the board's own NPU
    with pytest.raises(ModelLoadError, match=r"device index 1 is out of range: axengine found 1 on-board"):
        load_models(resolve_model_files(model_dir=pack)[0], "axengine", device_id=1)


def test_bad_device_index_is_one_error_before_any_session(fake, pack: Path) -> None:
    axengine = fake(devices=2)
    assert count_devices("axengine") == 2 and count_devices("onnxruntime") is None
    files, backend = resolve_model_files(model_dir=pack, backend="axengine")
    with pytest.raises(ModelLoadError) as err:
        load_models(files, backend, device_id=2)
    assert str(err.value) == (
        "device index 2 is out of range: axengine found 2 AXCL card(s); set DEVICE_ID to 0..1"
    )
    with pytest.raises(ModelLoadError, match="device index 5 is out of range"):
        check_models(files, backend, device_id=5)
    assert axengine.created == []


def test_several_cards_give_the_same_out_of_range_words_as_one(fake, pack: Path, settings_factory) -> None:
    from pi_axera_sd_service.service.engine import Engine

    axengine = fake(devices=2)
    settings = settings_factory(demo=False, model_dir=pack, backend="axengine", device_ids="0,2")
    with pytest.raises(ModelLoadError) as err:
        Engine(settings).start()
    assert str(err.value) == (
        "device index 2 is out of range: axengine found 2 AXCL card(s); set DEVICE_ID to 0..1"
    )
    assert axengine.created == []   # refused before any session


def test_pyaxengine_prints_become_one_debug_line_per_model(fake, pack: Path, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="pi_axera_sd_service.runtime")
    fake(imported=False)
    files, backend = resolve_model_files(model_dir=pack)
    load_models(files, backend)
    assert capsys.readouterr().out == ""
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert lines[0] == f"pyaxengine: available providers ['{CARD}']"
    assert lines[1:] == [
        f"{name}.axmodel on device 0: provider {CARD}, SoC AX650N, VNPU VNPUType.DISABLED, "
        "compiler 0.0-fake onnxruntime"
        for name in ("sd15_text_encoder_sim", "unet", "vae_decoder", "vae_encoder")
    ]


def test_capture_keeps_other_threads_output(capsys) -> None:
    inside, done = threading.Event(), threading.Event()
    captured: list[str] = []

    def loader() -> None:
        with pyaxengine_output() as printed:
            print("[INFO] SOC Name: AX650N")
            inside.set()
            done.wait(120)
        captured.append(printed.getvalue())

    worker = threading.Thread(target=loader)
    worker.start()
    assert inside.wait(120)
    print("the server's own line")
    done.set()
    worker.join()
    assert captured == ["[INFO] SOC Name: AX650N\n"]
    assert capsys.readouterr().out == "the server's own line\n"
    assert not isinstance(sys.stdout, _ThreadRoutedStdout)


def test_int64_text_encoder_is_refused_with_the_contract_and_no_noise(fake, pack: Path, monkeypatch) -> None:
    fake()
    copy_as_axmodel(pack / f"{TEXT_ENCODER}.onnx")
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    files, backend = resolve_model_files(model_dir=pack)
    with pytest.raises(ModelLoadError) as err:
        load_models(files, backend)
    assert AXMODEL_INPUT_IDS_RULE in str(err.value) and "Unsupported data type '9'" in str(err.value)
    lines = check_models(files, backend)
    report = format_check_lines(lines)
    assert f"[FAIL] text_encoder: {files.text_encoder}" in report and AXMODEL_INPUT_IDS_RULE in report
    assert report.endswith("1 problem(s) found") and lines[0].role == "device"
    gc.collect()
    assert seen == []  # pyaxengine's __del__ errors went to the debug log


def test_sessions_load_on_one_thread_and_run_on_another(fake, pack: Path) -> None:
    fake(devices=2)
    files, backend = resolve_model_files(model_dir=pack)
    loaded = []
    loader = threading.Thread(target=lambda: loaded.append(load_models(files, backend, device_id=1)))
    loader.start()
    loader.join()
    assert loaded[0].text_encoder.run(IDS)[0].shape == (1, 77, 768)


@pytest.mark.parametrize(("fail", "quoted"), [("init", "Failed to initialize axcl runtime. -1."),
                                              ("dlopen", "cannot load library 'libaxcl_rt.so'")])
def test_broken_runtime_is_named_with_what_to_check(fake, pack: Path, fail, quoted) -> None:
    fake(fail=fail)
    files, backend = resolve_model_files(model_dir=pack)  # auto: the import works
    assert backend == "axengine"
    with pytest.raises(ModelLoadError) as err:
        load_models(files, backend)
    message = str(err.value)
    assert message.startswith("the AXCL runtime failed to start: pyaxengine says ") and quoted in message
    assert all(word in message for word in ("axcl-smi", "driver", "/dev/axcl_host"))


def test_board_runtime_failure_is_named(fake, pack: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_AXE_FAIL", "init")
    fake(providers=BOARD)
    with pytest.raises(ModelLoadError, match=r"^the on-board NPU runtime failed to start: pyaxengine says "
                                             r"'Failed to initialize ax sys.'; check that libax_engine.so"):
        count_devices("axengine")


def test_loading_a_model_twice_on_a_card_warns(fake, pack: Path, caplog) -> None:
    fake()
    axengine_backend.AxEngineSession(pack / "unet.axmodel")
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    axengine_backend.AxEngineSession(pack / "unet.axmodel")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "unet.axmodel is loaded again on device 0" in warning and "restart the process" in warning


def test_auto_on_an_empty_folder_expects_axmodels_when_axengine_imports(fake, tmp_path: Path) -> None:
    fake()
    files, backend = resolve_model_files(model_dir=tmp_path)
    assert backend == "axengine" and files.unet == tmp_path / "unet.axmodel"


def test_auto_uses_onnxruntime_without_axmodel_files(fake, demo_pack: Path) -> None:
    fake()
    assert resolve_model_files(model_dir=demo_pack)[1] == "onnxruntime"


def test_missing_axengine_gives_install_hint(pack: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "axengine", None)  # makes `import axengine` fail
    axengine_backend.axengine_import_error.cache_clear()
    try:
        with pytest.raises(ModelLoadError, match="pyaxengine"):
            axengine_backend.AxEngineSession(pack / "unet.onnx")
        for onnx_file in list(pack.rglob("*.onnx")):  # only .axmodel files: auto cannot fall back
            onnx_file.unlink()
        with pytest.raises(ModelLoadError, match="axengine cannot be imported"):
            resolve_model_files(model_dir=pack)
    finally:
        axengine_backend.axengine_import_error.cache_clear()


# --- the command line on the axengine backend -------------------------------------------------------


def cli(*args: str | Path, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m pi_axera_sd_service ...` with the stand-in importable as `axengine` (one card)."""
    clean = {k: v for k, v in os.environ.items() if k not in MODEL_ENV + FAKE_ENV}
    clean.update(PYTHONPATH=str(FAKE_AXENGINE), FAKE_AXENGINE_PROVIDERS=CARD, **env)
    return subprocess.run([sys.executable, "-m", "pi_axera_sd_service", *map(str, args)], capture_output=True,
                          text=True, env=clean, cwd=cwd, timeout=300)


def our_lines_only(stdout: str) -> None:
    assert "[INFO]" not in stdout and "[WARNING]" not in stdout, stdout


def test_check_models_prints_only_its_report(pack: Path) -> None:
    proc = cli("check-models", pack, LOG_LEVEL="debug")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    our_lines_only(proc.stdout)
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        "backend: axengine (BACKEND=auto: .axmodel files found and pyaxengine (axengine) is importable)"
    )
    assert lines[1] == "[OK] device: 0 of 1 AXCL card(s) (axengine)"
    assert f"[OK] unet: {pack / 'unet.axmodel'} (axengine)" in lines and lines[-1] == "all models OK"
    assert f"unet.axmodel on device 0: provider {CARD}, SoC AX650N" in proc.stderr  # the debug log


def test_check_models_with_a_bad_device_is_one_line(pack: Path) -> None:
    proc = cli("check-models", pack, DEVICE_ID="1")
    assert proc.returncode == EXIT_CONFIG  # systemd does not restart a configuration error
    assert proc.stderr.splitlines() == [
        "pi-axera-sd: error: device index 1 is out of range: axengine found 1 AXCL card(s); "
        f"set DEVICE_ID to 0 (configuration error, exit code {EXIT_CONFIG})"
    ]


def test_check_models_refuses_an_int64_text_encoder_without_noise(pack: Path) -> None:
    copy_as_axmodel(pack / f"{TEXT_ENCODER}.onnx")
    proc = cli("check-models", pack)
    assert proc.returncode == 1
    assert AXMODEL_INPUT_IDS_RULE in proc.stdout
    assert proc.stderr == "pi-axera-sd: check-models: see the [FAIL] lines above\n"


def test_check_models_on_auto_with_a_broken_runtime(pack: Path) -> None:
    proc = cli("check-models", pack, FAKE_AXCL_FAIL="init")
    assert proc.returncode == EXIT_CONFIG and "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("pi-axera-sd: error: the AXCL runtime failed to start: pyaxengine says "
                           "'Failed to initialize axcl runtime. -1.'; check that `axcl-smi` lists the card")


def test_check_models_on_auto_lists_axmodel_names_for_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    proc = cli("check-models", cwd=tmp_path)
    assert proc.returncode == 1
    our_lines_only(proc.stdout)
    assert proc.stdout.startswith(
        "backend: axengine (BACKEND=auto: no model files yet; pyaxengine is importable, so .axmodel"
    )
    for name in ("sd15_text_encoder_sim.axmodel", "unet.axmodel", "vae_decoder.axmodel"):
        assert re.search(rf"\[FAIL\] \w+: models/.*{name} \(axengine\)", proc.stdout), (name, proc.stdout)
    assert ".onnx" not in proc.stdout


def test_generate_on_axengine_prints_only_our_lines_and_the_cpu_image(pack: Path, tmp_path: Path) -> None:
    images = {}
    for backend in ("axengine", "onnxruntime"):
        out = tmp_path / f"{backend}.png"
        proc = cli("generate", "--model-dir", pack, "--backend", backend, "--prompt", "a red fox",
                   "--seed", "3", "--steps", "2", "--output", out)
        assert proc.returncode == 0, proc.stderr
        our_lines_only(proc.stdout)
        assert proc.stdout.startswith("mode: txt2img\nseed: 3\n") and proc.stdout.endswith(f"saved: {out}\n")
        with Image.open(out) as image:
            images[backend] = np.asarray(image)
    np.testing.assert_array_equal(images["axengine"], images["onnxruntime"])  # the same graphs underneath
