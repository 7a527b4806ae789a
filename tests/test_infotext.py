"""A1111 infotext: format, quoting and parsing (Size-1/Size-2, Prompt, Negative prompt, defaults)."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from pi_axera_sd_service.pipeline.images import encode_image
from pi_axera_sd_service.service.errors import RequestError
from pi_axera_sd_service.service.infotext import (
    create_infotext,
    parse_generation_parameters,
    png_info,
    quote,
)


def make(**overrides) -> str:
    values = dict(
        prompt="a cat",
        negative_prompt="",
        steps=4,
        sampler="LCM",
        scheduler_label="Automatic",
        cfg_scale=1.0,
        seed=42,
        width=512,
        height=512,
        model_hash="0123456789",
        model_name="unet",
        version="v-test",
    )
    values.update(overrides)
    return create_infotext(**values)


def test_format_matches_a1111_order_and_omits_empty_negative_prompt() -> None:
    text = make()
    assert text == (
        "a cat\nSteps: 4, Sampler: LCM, Schedule type: Automatic, CFG scale: 1.0, Seed: 42, Size: 512x512, "
        "Model hash: 0123456789, Model: unet, Version: v-test"
    )
    with_negative = make(negative_prompt="blurry", denoising_strength=0.5, subseed=7, subseed_strength=0.25)
    lines = with_negative.split("\n")
    assert lines[1] == "Negative prompt: blurry"
    assert "Variation seed: 7, Variation seed strength: 0.25, Denoising strength: 0.5" in lines[2]
    assert "Variation seed" not in make(subseed=7, subseed_strength=0.0)


def test_values_with_comma_colon_or_newline_are_json_quoted() -> None:
    assert quote("plain value") == "plain value"
    assert quote("a, b") == '"a, b"' and quote("k: v") == '"k: v"' and quote("ü\n") == '"ü\\n"'
    text = make(extra={"Emphasis": "No norm", "Lora hashes": "a: 1, b: 2"})
    assert 'Lora hashes: "a: 1, b: 2"' in text and "Emphasis: No norm" in text


def test_round_trip_through_the_parser() -> None:
    text = make(
        prompt="a cat,\nin a hat",
        negative_prompt="blurry\nugly",
        seed=12345,
        cfg_scale=1.5,
        extra={"Lora hashes": "x: 1, y: 2"},
        denoising_strength=0.75,
    )
    parsed = parse_generation_parameters(text)
    assert parsed["Prompt"] == "a cat,\nin a hat"
    assert parsed["Negative prompt"] == "blurry\nugly"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "512")
    assert parsed["Seed"] == "12345" and parsed["CFG scale"] == "1.5" and parsed["Steps"] == "4"
    assert parsed["Lora hashes"] == "x: 1, y: 2" and parsed["Denoising strength"] == "0.75"
    assert parsed["Sampler"] == "LCM" and parsed["Model hash"] == "0123456789"


def test_parser_fills_a1111_defaults() -> None:
    parsed = parse_generation_parameters("hello\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1")
    assert parsed["Clip skip"] == "1" and parsed["Schedule type"] == "Automatic" and parsed["RNG"] == "GPU"
    assert parsed["Hires sampler"] == "Use same sampler" and parsed["VAE Decoder"] == "Full"
    assert "Emphasis" not in parsed
    assert (
        parse_generation_parameters("(very) good\nSteps: 4, Seed: 1, CFG scale: 1")["Emphasis"] == "Original"
    )


def test_a_last_line_with_fewer_than_three_params_is_prompt() -> None:
    parsed = parse_generation_parameters("first line\nnote: not params")
    assert parsed["Prompt"] == "first line\nnote: not params" and "note" not in parsed


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("data_uri", [False, True])
def test_png_info_reads_the_infotext_of_every_format(fmt: str, data_uri: bool) -> None:
    text = make(prompt="ünïcode: yes", negative_prompt="bad")
    raw = base64.b64encode(encode_image(Image.new("RGB", (16, 16)), fmt, text)).decode()
    body = png_info(f"data:image/{fmt};base64,{raw}" if data_uri else raw)
    assert body["info"] == text
    assert body["parameters"]["Prompt"] == "ünïcode: yes" and body["parameters"]["Seed"] == "42"


def test_png_info_without_infotext_and_bad_data() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    assert png_info(base64.b64encode(buf.getvalue()).decode()) == {"info": "", "items": {}, "parameters": {}}
    assert png_info("")["info"] == ""
    with pytest.raises(RequestError):
        png_info("not an image at all")


def test_a_param_with_an_empty_value_is_left_out_as_a1111_does() -> None:
    """A1111 indexes v[0] inside try/except, so `Sampler: ,` never sets Sampler."""
    parsed = parse_generation_parameters("a cat\nSteps: 4, Sampler: , Seed: 1, CFG scale: 1")
    assert "Sampler" not in parsed and parsed["Steps"] == "4" and parsed["Seed"] == "1"
