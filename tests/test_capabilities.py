"""Every row of the capability table, under the lenient and the strict policy (unit level)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from pi_axera_sd_service.api.protocol import Img2ImgRequest, Txt2ImgRequest
from pi_axera_sd_service.service.capabilities import CapabilityTable
from pi_axera_sd_service.service.errors import CapabilityError
from pi_axera_sd_service.service.plan import GenerationPlan
from pi_axera_sd_service.service.request import GenerationRequest, from_sdapi
from pi_axera_sd_service.service.results import extra_generation_params
from pi_axera_sd_service.settings import Settings

POLICIES = [False, True]


def make_table(
    strict: bool = False, with_encoder: bool = True, time_table: bool = False, **settings: Any
) -> CapabilityTable:
    """A table for 512x512 models with the four published time rows (`time_table`: a row for every t)."""
    models = SimpleNamespace(
        image_size=(512, 512), time=SimpleNamespace(full=time_table),
        vae_encoder=object() if with_encoder else None,
    )
    return CapabilityTable.from_models(models, Settings(strict=strict, **settings))


def req(**fields: Any) -> GenerationRequest:
    if fields.get("mode") == "img2img":
        fields.setdefault("init_images", [Image.new("RGB", (64, 64))])
        fields.setdefault("denoising_strength", 0.75)
    return GenerationRequest(**fields)


def sdapi(mode: str, payload: dict[str, Any], tmp_path: Path) -> GenerationRequest:
    model = (Txt2ImgRequest if mode == "txt2img" else Img2ImgRequest).model_validate(payload)
    return from_sdapi(mode, model.model_dump(), model.model_fields_set, Settings(state_dir=tmp_path))


def outcome(table: CapabilityTable, request: GenerationRequest) -> GenerationPlan | CapabilityError:
    try:
        return table.apply(request)
    except CapabilityError as exc:
        return exc


# ---------------------------------------------------------------- clamps: warn when lenient, 422 when strict
CLAMPS = [
    ("width", dict(width=768, height=576), lambda r: (r.width, r.height) == (512, 512)),
    ("steps", dict(steps=20), lambda r: r.steps == 4 and r.timesteps == (999, 759, 499, 259)),
    ("steps", dict(steps=0), lambda r: r.steps == 1 and r.timesteps == (999,)),
    ("cfg_scale", dict(cfg_scale=7.0), lambda r: r.cfg_scale == 2.0),
    (
        "n_iter",
        dict(batch_size=4, n_iter=4),
        lambda r: r.batch_size * r.n_iter <= 8 and r.batch_size == 4,
    ),
    ("batch_size", dict(batch_size=12), lambda r: (r.batch_size, r.n_iter) == (8, 1)),
    ("subseed_strength", dict(subseed_strength=1.5), lambda r: r.subseed_strength == 1.0),
    (
        "denoising_strength",
        dict(mode="img2img", denoising_strength=1.7),
        lambda r: r.denoising_strength == 1.0,
    ),
    (
        "denoising_strength",
        dict(mode="img2img", denoising_strength=0.0),
        lambda r: 0 < r.denoising_strength <= 0.05 and r.timesteps == (259,),
    ),
    ("sampler_name", dict(sampler_name="Euler a"), lambda r: r.sampler_name == "LCM"),
]


@pytest.mark.parametrize("strict", POLICIES)
@pytest.mark.parametrize(("field", "fields", "check"), CLAMPS)
def test_clamped_fields_warn_or_reject(strict: bool, field: str, fields: dict, check) -> None:
    result = outcome(make_table(strict), req(**fields))
    if strict:
        assert isinstance(result, CapabilityError) and result.field == field
        assert result.status_code == 422
    else:
        assert isinstance(result, GenerationPlan) and check(result)
        assert any(field in w for w in result.warnings), result.warnings


@pytest.mark.parametrize(("field", "fields", "check"), CLAMPS)
def test_strict_refusals_say_nothing_ran_warnings_say_what_ran(field: str, fields: dict, check) -> None:
    warning = outcome(make_table(), req(**fields)).warnings[0]
    refusal = outcome(make_table(strict=True), req(**fields)).message
    assert "; ran " in warning or "; generated " in warning, warning
    assert "refused in strict mode" in refusal and " ran " not in refusal and "generated" not in refusal
    assert refusal.split(";")[0] == warning.split(";")[0]   # the same statement of the problem


@pytest.mark.parametrize(
    ("fields", "warning", "refusal"),
    [
        (dict(steps=9), "steps 9 is not supported (1–4); ran 4",
         "steps 9 is not supported (1–4); refused in strict mode"),
        (dict(cfg_scale=7.0), "cfg_scale 7 is above the maximum 2; ran 2",
         "cfg_scale 7 is above the maximum 2; refused in strict mode"),
        (dict(sampler_name="Euler a"), "sampler_name 'Euler a' is not available; ran LCM",
         "sampler_name 'Euler a' is not available; refused in strict mode "
         "(supported: LCM or its aliases k_lcm, lcm)"),
        (dict(width=768),
         "width x height 768x512 is not supported; generated 512x512 (the compiled models' size)",
         "width x height 768x512 is not supported; refused in strict mode "
         "(supported: 512x512, the compiled models' size)"),
    ],
)
def test_clamp_messages_under_each_policy(fields: dict, warning: str, refusal: str) -> None:
    assert make_table().apply(req(**fields)).warnings == (warning,)
    assert outcome(make_table(strict=True), req(**fields)).message == refusal


@pytest.mark.parametrize("strict", POLICIES)
def test_steps_beyond_max_steps_with_a_time_table(strict: bool) -> None:
    """With a time table the limit is MAX_STEPS (default 8), not the four rows."""
    table = make_table(strict=strict, time_table=True)
    if strict:
        refusal = outcome(table, req(steps=9)).message
        assert refusal == "steps 9 is not supported (1–8); refused in strict mode"
    else:
        plan = table.apply(req(steps=20))
        assert plan.warnings == ("steps 20 is not supported (1–8); ran 8",)
        assert plan.steps == 8 and plan.timesteps == (999, 879, 759, 639, 499, 379, 259, 139)
    small = make_table(strict=strict, time_table=True, max_steps=6)
    assert small.max_steps == 6 and small.apply(req(steps=6)).timesteps == (999, 839, 679, 499, 339, 179)
    assert "(1–6)" in str(outcome(small, req(steps=7)))
    assert make_table(strict=strict, max_steps=20).max_steps == 4   # no table: the four rows decide


# ---------------------------------------------------------------- warn under both policies
WARNINGS = [
    (dict(scheduler="normal"), "scheduler"),
    (dict(sampler_name="LCM Karras"), "scheduler 'Karras'"),
    (dict(negative_prompt="blurry", cfg_scale=1.0), "negative_prompt"),
    (dict(mode="img2img", resize_mode=3), "resize_mode 3"),
    (dict(unsupported={"enable_hr": True}), "enable_hr"),
    (dict(unsupported={"restore_faces": True}), "restore_faces"),
    (dict(unsupported={"tiling": True}), "tiling"),
    (dict(unsupported={"styles": ["cinematic"]}), "styles"),
    (dict(unsupported={"clip_skip": 2}), "clip_skip"),
    (dict(unsupported={"seed_resize_from_w": 640}), "seed_resize_from_w"),
    (dict(override_settings={"no_such_option": 1}), "no_such_option"),
    (dict(override_settings={"CLIP_stop_at_last_layers": 2}), "CLIP_stop_at_last_layers"),
]


@pytest.mark.parametrize("strict", POLICIES)
@pytest.mark.parametrize(("fields", "needle"), WARNINGS)
def test_warned_fields_never_fail(strict: bool, fields: dict, needle: str) -> None:
    result = make_table(strict).apply(req(**fields))
    assert any(needle in w for w in result.warnings), result.warnings


@pytest.mark.parametrize("strict", POLICIES)
def test_resize_mode_3_runs_as_0_and_others_are_rejected(strict: bool) -> None:
    assert make_table(strict).apply(req(mode="img2img", resize_mode=3)).resize_mode == 0
    for mode in (1, 2):
        assert make_table(strict).apply(req(mode="img2img", resize_mode=mode)).warnings == ()
    with pytest.raises(CapabilityError) as err:
        make_table(strict).apply(req(mode="img2img", resize_mode=7))
    assert err.value.field == "resize_mode"


# ---------------------------------------------------------------- rejections under both policies
REJECTIONS = [
    (dict(script_name="x/y plot"), "script_name", "Script 'x/y plot' not found"),
    (dict(alwayson_scripts={"ADetailer": {"args": [False]}}), "alwayson_scripts", "ADetailer"),
    (dict(mode="img2img", mask_given=True), "mask", "inpainting is not supported"),
    (dict(seed="abc"), "seed", "integer"),
    (dict(seed=1.5), "seed", "integer"),
    (dict(subseed=[1]), "subseed", "integer"),
]


@pytest.mark.parametrize("strict", POLICIES)
@pytest.mark.parametrize(("fields", "field", "needle"), REJECTIONS)
def test_rejected_fields(strict: bool, fields: dict, field: str, needle: str) -> None:
    with pytest.raises(CapabilityError) as err:
        make_table(strict).apply(req(**fields))
    assert err.value.field == field and needle in err.value.message and err.value.status_code == 422


def test_img2img_needs_the_vae_encoder() -> None:
    with pytest.raises(CapabilityError, match="img2img"):
        make_table(with_encoder=False).apply(req(mode="img2img"))
    assert make_table(with_encoder=False).to_dict()["modes"] == ["txt2img"]


# ---------------------------------------------------------------- supported values are silent
@pytest.mark.parametrize("strict", POLICIES)
@pytest.mark.parametrize(
    ("steps", "rows"),
    [
        (1, [999]),
        (2, [999, 499]),
        (3, [999, 759, 259]),
        (4, [999, 759, 499, 259]),
        (None, [999, 759, 499, 259]),
    ],
)
def test_steps_use_the_stored_rows(strict: bool, steps: int | None, rows: list[int]) -> None:
    result = make_table(strict).apply(req(steps=steps))
    assert list(result.timesteps) == rows and result.warnings == ()


# diffusers' LCMScheduler.set_timesteps(n) (original_inference_steps 50) for n = 1..8
DIFFUSERS_LCM = {
    1: [999], 2: [999, 499], 3: [999, 679, 339], 4: [999, 759, 499, 259],
    5: [999, 799, 599, 399, 199], 6: [999, 839, 679, 499, 339, 179],
    7: [999, 859, 719, 579, 439, 299, 159], 8: [999, 879, 759, 639, 499, 379, 259, 139],
}


@pytest.mark.parametrize("strict", POLICIES)
@pytest.mark.parametrize("steps", [*range(1, 9), None])
def test_steps_run_diffusers_schedules_with_a_time_table(strict: bool, steps: int | None) -> None:
    plan = make_table(strict, time_table=True).apply(req(steps=steps))
    assert list(plan.timesteps) == DIFFUSERS_LCM[steps or 4] and plan.warnings == ()
    assert plan.steps == (steps or 4)   # left out: the upstream 4-step schedule, as without a table


@pytest.mark.parametrize(
    ("steps", "strength", "rows"),
    [(8, 0.5, [499, 379, 259, 139]), (7, 0.5, [579, 439, 299, 159]), (7, 0.25, [299, 159]),
     (3, 0.75, [679, 339]), (None, 0.75, [759, 499, 259])],
)
def test_img2img_with_a_time_table_runs_the_tail_of_the_diffusers_schedule(
    steps: int | None, strength: float, rows: list[int]
) -> None:
    plan = make_table(time_table=True).apply(req(mode="img2img", steps=steps, denoising_strength=strength))
    assert list(plan.timesteps) == rows and plan.warnings == ()


def test_capability_table_states_what_the_time_inputs_allow() -> None:
    four, full = make_table().to_dict(), make_table(time_table=True).to_dict()
    assert (four["time_table"], four["max_steps"], four["timesteps"]) == (False, 4, [999, 759, 499, 259])
    assert (full["time_table"], full["max_steps"], full["timesteps"]) == (True, 8, list(range(999, 0, -20)))
    assert full["schedules"]["3"] == [999, 679, 339] and four["schedules"]["3"] == [999, 759, 259]
    steps = {d["max_steps"]: next(r for r in d["rows"] if r["field"] == "steps") for d in (four, full)}
    assert steps[4]["supported"].startswith("1–4, default 4:") and "time_input_table.npy" in steps[4]["note"]
    assert steps[8]["supported"].startswith("1–8, default 4:") and "7→[999, 859, 719" in steps[8]["supported"]


@pytest.mark.parametrize(
    ("strength", "rows"), [(1.0, [999, 759, 499, 259]), (0.5, [499, 259]), (0.25, [259])]
)
def test_img2img_runs_the_tail_of_the_schedule(strength: float, rows: list[int]) -> None:
    assert list(make_table().apply(req(mode="img2img", denoising_strength=strength)).timesteps) == rows


@pytest.mark.parametrize("strict", POLICIES)
@pytest.mark.parametrize("name", ["LCM", "lcm", "k_lcm", "LCM Automatic", None])
def test_lcm_names_are_silent(strict: bool, name: str | None) -> None:
    assert make_table(strict).apply(req(sampler_name=name, scheduler="automatic")).warnings == ()


def test_guidance_range_and_guidance_off() -> None:
    ran = make_table().apply(req(cfg_scale=1.5, negative_prompt="blurry"))
    assert ran.cfg_scale == 1.5 and ran.warnings == ()
    off = make_table(guidance="off").apply(req(cfg_scale=1.5))
    assert off.cfg_scale == 1.0 and any("guidance=off" in w for w in off.warnings)
    assert make_table(strict=True, guidance="off").apply(req(cfg_scale=1.5)).cfg_scale == 1.0
    assert make_table(max_cfg_scale=3.0).apply(req(cfg_scale=3.0)).cfg_scale == 3.0


def test_seeds_follow_a1111() -> None:
    table = make_table()
    fixed = table.apply(req(seed=100, subseed=7, batch_size=2, n_iter=2))
    assert fixed.all_seeds == (100, 101, 102, 103) and fixed.all_subseeds == (7, 8, 9, 10)
    varied = table.apply(req(seed="100", subseed=7, subseed_strength=0.3, batch_size=3))
    assert varied.all_seeds == (100, 100, 100)
    for empty in (-1, None, ""):
        drawn = table.apply(req(seed=empty, batch_size=2))
        assert 0 <= drawn.seed < 2**32 and drawn.all_seeds[1] == drawn.seed + 1
    top = table.apply(req(seed=2**32 - 1, n_iter=2))  # A1111 adds i without wrapping
    assert top.all_seeds == (4294967295, 4294967296)
    jobs = fixed.image_jobs()
    assert [j.seed for j in jobs] == [100, 101, 102, 103] and all(
        tuple(j.timesteps) == fixed.timesteps for j in jobs
    )


def test_init_images_are_resized_and_cycled_over_the_batch() -> None:
    red, blue = Image.new("RGB", (300, 200), "red"), Image.new("RGB", (64, 64), "blue")
    applied = make_table().apply(req(mode="img2img", init_images=[red, blue], batch_size=2, n_iter=2))
    jobs = applied.image_jobs()
    assert all(j.init_image.size == (512, 512) for j in jobs)
    colours = [j.init_image.getpixel((256, 256)) for j in jobs]
    assert colours[0] == colours[2] == (255, 0, 0) and colours[1] == colours[3] == (0, 0, 255)


def test_override_settings_apply_to_that_request_only() -> None:
    table = make_table()
    options = {"emphasis": "Original", "samples_format": "png", "jpeg_quality": 80}
    ran = table.apply(req(override_settings={"emphasis": "No norm", "samples_format": "webp"}), options)
    assert (ran.emphasis, ran.samples_format, ran.warnings) == ("No norm", "webp", ())
    assert extra_generation_params(ran) == {"Emphasis": "No norm"}  # in the infotext only when not Original
    assert options["emphasis"] == "Original"
    assert table.apply(req(), options).emphasis == "Original"
    assert extra_generation_params(table.apply(req(), options)) == {}


# ---------------------------------------------------------------- what clients send by default
WEBUIAPI_TXT2IMG = {
    "enable_hr": False,
    "hr_scale": 2,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_checkpoint_name": None,
    "hr_sampler_name": None,
    "hr_scheduler": None,
    "hr_prompt": "",
    "hr_negative_prompt": "",
    "denoising_strength": 0.7,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "prompt": "a cat",
    "styles": [],
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0.0,
    "seed_resize_from_h": 0,
    "seed_resize_from_w": 0,
    "batch_size": 1,
    "n_iter": 1,
    "steps": 4,
    "cfg_scale": 1.0,
    "width": 512,
    "height": 512,
    "restore_faces": False,
    "tiling": False,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "negative_prompt": "",
    "eta": 1.0,
    "s_churn": 0,
    "s_tmax": 0,
    "s_tmin": 0,
    "s_noise": 1,
    "override_settings": {},
    "override_settings_restore_afterwards": True,
    "sampler_name": "LCM",
    "scheduler": "automatic",
    "sampler_index": "LCM",
    "script_name": None,
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
}


@pytest.mark.parametrize("strict", POLICIES)
def test_client_default_values_produce_no_warning(strict: bool, tmp_path: Path) -> None:
    table = make_table(strict)
    assert table.apply(sdapi("txt2img", WEBUIAPI_TXT2IMG, tmp_path)).warnings == ()
    aiya = {
        "prompt": "a",
        "seed_resize_from_h": -1,
        "seed_resize_from_w": -1,
        "denoising_strength": None,
        "sampler_index": "LCM",
        "styles": [],
        "override_settings": {"CLIP_stop_at_last_layers": 1},
    }
    assert table.apply(sdapi("txt2img", aiya, tmp_path)).warnings == ()
    img2img = {
        k: v for k, v in WEBUIAPI_TXT2IMG.items() if not k.startswith(("hr_", "firstphase", "enable_hr"))
    }
    img2img.update(
        init_images=[_png_b64()],
        resize_mode=0,
        denoising_strength=0.75,
        mask_blur=4,
        inpainting_fill=0,
        inpaint_full_res=True,
        inpaint_full_res_padding=0,
        inpainting_mask_invert=0,
        initial_noise_multiplier=1,
        image_cfg_scale=1.5,
        include_init_images=False,
    )
    assert table.apply(sdapi("img2img", img2img, tmp_path)).warnings == ()
    assert table.apply(sdapi("txt2img", {"prompt": "only a prompt"}, tmp_path)).warnings == ()


def _png_b64() -> str:
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "green").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_to_dict_lists_every_row_with_both_policies() -> None:
    lenient, strict = make_table().to_dict(), make_table(strict=True).to_dict()
    fields = " ".join(r["field"] for r in lenient["rows"])
    for name in (
        "width",
        "steps",
        "sampler_name",
        "sampler_index",
        "scheduler",
        "cfg_scale",
        "negative_prompt",
        "seed",
        "subseed_strength",
        "batch_size",
        "n_iter",
        "denoising_strength",
        "resize_mode",
        "init_images",
        "mask",
        "enable_hr",
        "restore_faces",
        "tiling",
        "styles",
        "clip_skip",
        "seed_resize_from",
        "script_name",
        "alwayson_scripts",
        "override_settings",
        "eta",
        "s_noise",
    ):
        assert name in fields, name
    assert all({"field", "supported", "otherwise", "strict", "note"} <= set(r) for r in lenient["rows"])
    by_field = {r["field"]: r for r in strict["rows"]}
    assert by_field["steps"]["strict"] == "reject" and by_field["scheduler"]["strict"] == "warn"
    assert lenient["image_size"] == {"width": 512, "height": 512} and lenient["policy"] == "lenient"
    assert strict["policy"] == "strict"


@pytest.mark.parametrize(("override", "needle"), [
    ({"jpeg_quality": True}, "jpeg_quality"), ({"jpeg_quality": 0}, "jpeg_quality"),
    ({"samples_format": None}, "samples_format"), ({"emphasis": ["No norm"]}, "emphasis"),
])
def test_override_settings_are_checked_like_posted_options(override: dict, needle: str) -> None:
    ran = make_table().apply(req(override_settings=override), {"jpeg_quality": 80, "samples_format": "png"})
    assert (ran.jpeg_quality, ran.samples_format, ran.emphasis) == (80, "png", "Original")
    assert len(ran.warnings) == 1 and needle in ran.warnings[0]


def test_override_samples_format_jpg_is_jpeg() -> None:
    ran = make_table().apply(req(override_settings={"samples_format": "JPG"}), {})
    assert ran.samples_format == "jpeg" and ran.warnings == ()


def test_no_style_names_are_not_warned_about() -> None:
    """AIYA sends styles ["None"] when no style is chosen; A1111 ignores it silently, so do we."""
    assert make_table().apply(req(unsupported={"styles": ["None", ""]})).warnings == ()
    mixed = make_table().apply(req(unsupported={"styles": ["None", "cinematic"]}))
    assert mixed.warnings == ("styles ['cinematic'] are not supported (none installed); ignored",)
