"""Image metrics against known values, `compare` on tiny pipelines, and quantization of real trained weights."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertModel
from typer.testing import CliRunner

from pipequant import PipelineQuantizationConfig, compare, load_model, load_pipeline
from pipequant.cli import app
from pipequant.planning.sizing import estimate_component
from pipequant.presets import preset
from pipequant.quality.metrics import psnr, ssim
from pipequant.report import component_memory
from pipequant.testing.minilm import minilm_folder, sentence_embeddings


def _ramp() -> tuple[np.ndarray, np.ndarray]:
    i, j = np.mgrid[0:32, 0:40]
    return ((i * 7 + j * 13) % 256).astype(np.uint8), ((i * 7 + j * 13 + (i * j) % 23) % 256).astype(np.uint8)


def test_ssim_of_identical_images_is_one_and_psnr_infinite():
    image = _ramp()[0]
    assert ssim(image, image) == 1.0
    assert psnr(image, image) == math.inf


def test_ssim_matches_known_values():
    # constant images: only the luminance term is left, (2ab + C1) / (a^2 + b^2 + C1)
    c1 = (0.01 * 255) ** 2
    assert ssim(np.full((16, 16), 100.0), np.full((16, 16), 150.0)) == pytest.approx(
        (2 * 100 * 150 + c1) / (100**2 + 150**2 + c1)
    )
    # computed with scipy.ndimage.gaussian_filter(sigma=1.5, truncate=3.5) and a 5-pixel crop, as scikit-image does
    assert ssim(*_ramp()) == pytest.approx(0.6876709469154852, abs=1e-12)
    # per channel, then averaged
    a, b = _ramp()
    assert ssim(np.stack([a, a], -1), np.stack([b, a], -1)) == pytest.approx((0.6876709469154852 + 1) / 2, abs=1e-12)


def test_psnr_matches_its_definition():
    a = np.full((8, 8, 3), 100, np.uint8)
    assert psnr(a, a + 5) == pytest.approx(10 * math.log10(255**2 / 25))


def test_ssim_refuses_images_smaller_than_its_window():
    with pytest.raises(ValueError, match="at least 11 x 11"):
        ssim(np.zeros((8, 8)), np.zeros((8, 8)))


def test_compare_reports_components_and_images(flux_path, tmp_path):
    """An identical pipeline scores perfectly; an int8 transformer has a small error there and nowhere else."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = load_pipeline(flux_path, torch_dtype=torch.bfloat16)
        identical = load_pipeline(flux_path, torch_dtype=torch.bfloat16)
        int8 = load_pipeline(
            flux_path,
            PipelineQuantizationConfig(quant_backend="bitsandbytes_8bit", components_to_quantize=["transformer"]),
            torch_dtype=torch.bfloat16,
        )
        report = compare(
            reference,
            {"identical": identical, "int8": int8},
            ["photo of a cute dog", "a red car"],
            [0, 1],
            out_dir=tmp_path,
            num_inference_steps=2,
            height=64,
            width=64,
        )

    errors = {(row.variant, row.component): row for row in report.components}
    assert {c for _, c in errors} == {"text_encoder", "text_encoder_2", "transformer", "vae"}
    assert all(row.max == 0 for (variant, _), row in errors.items() if variant == "identical")
    assert 0 < errors["int8", "transformer"].mean < 0.05
    assert errors["int8", "transformer"].calls == 2 * 4  # 2 steps for each of 4 generations
    assert all(errors["int8", c].max == 0 for c in ("text_encoder", "text_encoder_2", "vae"))

    scores = {(s.variant, s.prompt, s.seed): s for s in report.images}
    assert len(scores) == 8
    assert all(s.psnr == math.inf and s.ssim == 1.0 for (v, _, _), s in scores.items() if v == "identical")
    assert all(20 < s.psnr < math.inf and 0.9 < s.ssim < 1 for (v, _, _), s in scores.items() if v == "int8")

    grid = Image.open(report.grid)
    assert grid.width >= 3 * 256 and grid.height >= 4 * 256  # 4 rows of reference + 2 variants, scaled up
    text = report.markdown.read_text()
    assert "| identical | photo of a cute dog | 0 | inf | 1.0000 |" in text
    assert "| int8 | transformer | 8 |" in text and "![reference and variants](grid.png)" in text


def test_cli_compare_writes_the_report(flux_path, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(flux_path),
            "--config",
            "quanto-int8:transformer",
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--height",
            "64",
            "--width",
            "64",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "grid.png").is_file()
    assert "| quanto-int8:transformer | transformer | 2 |" in (tmp_path / "report.md").read_text()


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """all-MiniLM-L6-v2's real weights, and its float32 sentence embeddings."""
    folder = minilm_folder(tmp_path_factory.mktemp("minilm"))
    return folder, sentence_embeddings(load_model(BertModel, folder), folder)


@pytest.mark.parametrize("mode", ["bnb-int8", "torchao-int8wo", "quanto-int8", "gguf-Q8_0"])
def test_int8_modes_keep_minilm_sentence_embeddings(minilm, mode):
    folder, reference = minilm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(BertModel, folder, preset(mode))
    cosine = torch.nn.functional.cosine_similarity(sentence_embeddings(model, folder), reference)
    assert cosine.min() > 0.998, cosine.min()
    measured = component_memory("bert", model)
    assert measured.quantized_layers == 37  # 6 layers x (q, k, v, out, up, down) + the pooler
    assert estimate_component("bert", BertModel, folder, preset(mode), None).bytes_after == measured.bytes_after
