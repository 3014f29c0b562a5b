"""Size estimates against what the loader really holds, and plans that fit their budget once loaded."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel
from typer.testing import CliRunner

from pipequant import (
    BitsAndBytesConfig,
    BudgetError,
    GGUFQuantizationConfig,
    PipelineQuantizationConfig,
    QuantoConfig,
    TorchAoConfig,
    estimate,
    load_model,
    load_pipeline,
    plan,
)
from pipequant.cli import app
from pipequant.planning import parse_budget
from pipequant.planning.sizing import estimate_component
from pipequant.presets import PRESETS, preset, usable
from pipequant.report import component_memory, memory_report

CPU = torch.device("cpu")
BF16 = torch.bfloat16


def _assert_close(estimated, measured) -> None:
    """Estimated rows against `memory_report` rows: bytes within 1%, everything counted the same."""
    by_name = {row.name: row for row in measured}
    assert sorted(by_name) == sorted(row.name for row in estimated)
    for row in estimated:
        real = by_name[row.name]
        assert abs(row.bytes_after - real.bytes_after) <= 0.01 * real.bytes_after, (row, real)
        assert (row.bytes_before, row.parameters, row.quantized_layers, row.backend, row.dtype) == (
            real.bytes_before,
            real.parameters,
            real.quantized_layers,
            real.backend,
            real.dtype,
        ), row.name


MIXED = PipelineQuantizationConfig(
    quant_mapping={
        # 128-wide rows fall back from Q6_K to Q8_0; the rule and the kept layer change two more
        "transformer": GGUFQuantizationConfig(
            quant_type="Q6_K", type_rules={"proj_out": "Q4_0"}, modules_to_not_convert=["x_embedder"]
        ),
        "text_encoder_2": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True
        ),
        "text_encoder": QuantoConfig(weights_dtype="int4"),
    }
)


@pytest.mark.parametrize(
    ("kind", "config", "dtype"),
    [
        ("flux", None, None),
        ("flux", None, torch.float16),  # T5 keeps `wo` in float32 at float16; its embeddings are tied
        ("flux", MIXED, BF16),
        ("sd", PipelineQuantizationConfig(quant_backend="bitsandbytes_8bit"), torch.float16),
    ],
    ids=["flux-fp32", "flux-fp16", "flux-mixed-bf16", "sd-int8-fp16"],
)
def test_estimate_matches_the_loaded_pipeline(request, kind, config, dtype):
    path = request.getfixturevalue(f"{kind}_path")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = memory_report(load_pipeline(path, config, dtype))
    _assert_close(estimate(path, config, dtype), measured)


#: every mode that runs on CPU, plus settings that change sizes in other ways
EXTRA_CONFIGS = {
    "bnb-nf4-dq-bf16-storage": lambda: BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_quant_storage="bfloat16"
    ),
    "torchao-float8wo_e4m3": lambda: TorchAoConfig("float8wo_e4m3"),
    "torchao-uint2wo": lambda: TorchAoConfig("uint2wo"),
    "torchao-int8wo-group64": lambda: TorchAoConfig("int8wo", group_size=64),
    "quanto-int8-float8-activations": lambda: QuantoConfig(weights_dtype="int8", activations_dtype="float8"),
    "gguf-Q8_0-float32-compute": lambda: GGUFQuantizationConfig(quant_type="Q8_0", compute_dtype=torch.float32),
}
CPU_MODES = [mode for mode in PRESETS if usable(mode, CPU)] + list(EXTRA_CONFIGS)


@pytest.mark.parametrize("mode", CPU_MODES)
def test_estimate_matches_every_cpu_mode(flux_path, mode):
    """One component per mode (CLIP: rows of 256 and 512), in bfloat16 but for every third mode in float32."""
    config = EXTRA_CONFIGS[mode]() if mode in EXTRA_CONFIGS else preset(mode)
    dtype = torch.float32 if CPU_MODES.index(mode) % 3 == 0 else BF16
    folder = flux_path / "text_encoder"
    model = load_model(CLIPTextModel, folder, config, dtype)
    _assert_close([estimate_component("te", CLIPTextModel, folder, config, dtype)], [component_memory("te", model)])


def test_estimate_counts_gguf_fallbacks_and_torchao_on_the_transformer(flux_path):
    """The transformer's 128-wide rows take other GGML types; torchao's per-group scales follow the row length."""
    folder = flux_path / "transformer"
    for config in (GGUFQuantizationConfig(quant_type="Q4_K", type_rules={"*.ff.*": "Q5_K"}), TorchAoConfig("uint4wo")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = load_model(FluxTransformer2DModel, folder, config, BF16)
        estimated = estimate_component("transformer", FluxTransformer2DModel, folder, config, BF16)
        _assert_close([estimated], [component_memory("transformer", model)])


def _total(path, config, dtype=BF16) -> int:
    return sum(row.bytes_after for row in estimate(path, config, dtype))


def test_plan_fits_its_budget_once_loaded(flux_path):
    budget = int(0.5 * _total(flux_path, None))
    config, explanation = plan(flux_path, budget, BF16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = memory_report(load_pipeline(flux_path, config, BF16))
    assert sum(row.bytes_after for row in loaded) == explanation.total <= budget
    assert {row.name: row.bytes_after for row in loaded} == {row.name: row.nbytes for row in explanation.components}
    assert all(0 <= row.error < 0.2 for row in explanation.components)
    assert any(row.quantized_layers for row in explanation.components)


def test_plan_mixes_gguf_types_per_layer(flux_path):
    """Between all-Q4_K and all-Q8_0, the plan keeps the layers that lose most at more bits (type_rules)."""
    only = ["text_encoder_2"]
    q4 = _total(
        flux_path,
        PipelineQuantizationConfig(
            quant_backend="gguf", quant_kwargs={"quant_type": "Q4_K"}, components_to_quantize=only
        ),
    )
    q8 = _total(
        flux_path,
        PipelineQuantizationConfig(
            quant_backend="gguf", quant_kwargs={"quant_type": "Q8_0"}, components_to_quantize=only
        ),
    )
    budget = (q4 + q8) // 2
    config, explanation = plan(flux_path, budget, BF16, candidates=["gguf-Q8_0", "gguf-Q4_K"], components=only)
    chosen = config.quant_mapping["text_encoder_2"]
    assert isinstance(chosen, GGUFQuantizationConfig) and chosen.type_rules
    assert set(chosen.type_rules.values()) | {chosen.quant_type} == {"Q8_0", "Q4_K"}
    assert _total(flux_path, config) == explanation.total <= budget
    row = next(c for c in explanation.components if c.name == "text_encoder_2")
    assert row.alternatives["gguf-Q4_K"][1] > row.error > row.alternatives["gguf-Q8_0"][1]


def test_plan_keeps_the_most_sensitive_layers_in_full_precision(flux_path):
    """With one 8-bit mode and a budget above its size, the bytes left keep whole layers unquantized."""
    only = ["transformer"]
    int8 = _total(flux_path, PipelineQuantizationConfig(quant_backend="bitsandbytes_8bit", components_to_quantize=only))
    full = _total(flux_path, None)
    config, explanation = plan(flux_path, (int8 + full) // 2, BF16, candidates=["bnb-int8"], components=only)
    chosen = config.quant_mapping["transformer"]
    assert chosen.backend_name == "bitsandbytes_8bit" and chosen.modules_to_not_convert
    row = next(c for c in explanation.components if c.name == "transformer")
    assert row.kept_layers == len(chosen.modules_to_not_convert) and row.quantized_layers > 0
    assert _total(flux_path, config) == explanation.total <= (int8 + full) // 2


def test_plan_is_none_when_the_pipeline_fits_unquantized(sd_path):
    config, explanation = plan(sd_path, "1GB", BF16)
    assert config is None
    assert all(row.choice == "full precision" for row in explanation.components)


def test_impossible_budget_names_the_smallest_size(flux_path):
    with pytest.raises(
        BudgetError, match=r"No plan fits 1\.00 MB: the smallest .* is [0-9.]+ MB \(\d+ bytes\)"
    ) as info:
        plan(flux_path, "1MB", BF16, candidates=["bnb-nf4", "quanto-int4"])
    smallest = int(str(info.value).split("(")[1].split(" bytes")[0])
    # nothing quantizes below this: the smallest mode on every component
    assert smallest <= min(
        _total(
            flux_path,
            PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs={"bnb_4bit_quant_type": "nf4"}),
        ),
        _total(flux_path, PipelineQuantizationConfig(quant_backend="quanto", quant_kwargs={"weights_dtype": "int4"})),
    )
    config, _ = plan(flux_path, smallest, BF16, candidates=["bnb-nf4", "quanto-int4"])
    assert _total(flux_path, config) == smallest


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GB", 8 * 10**9), ("7.5 GiB", int(7.5 * 2**30)), ("500MB", 5 * 10**8), (123, 123), ("64kb", 64000)],
)
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


def test_parse_budget_refuses_nonsense():
    with pytest.raises(ValueError, match="not a size"):
        parse_budget("eight gigs")


runner = CliRunner()


def test_cli_inspect_estimates_a_config_and_every_mode(flux_path):
    result = runner.invoke(
        app,
        [
            "inspect",
            str(flux_path),
            "--config",
            "bnb-nf4:transformer,text_encoder_2",
            "--dtype",
            "bfloat16",
            "--all-modes",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Estimate" in result.output and "bitsandbytes_4bit" in result.output
    assert "Estimated bytes per mode" in result.output and "gguf-Q4_K" in result.output


def test_cli_plan_writes_a_config_that_loads(flux_path, tmp_path):
    out = tmp_path / "plan.json"
    budget = int(0.6 * _total(flux_path, None))
    result = runner.invoke(
        app, ["plan", str(flux_path), "--budget", str(budget), "--dtype", "bfloat16", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "Plan for a budget" in result.output and "Candidates per component" in result.output
    assert set(json.loads(out.read_text())) <= {"text_encoder", "text_encoder_2", "transformer", "vae"}
    result = runner.invoke(app, ["inspect", str(flux_path), "--config", str(out), "--dtype", "bfloat16"])
    assert result.exit_code == 0, result.output


def test_estimate_refuses_a_gguf_config_without_a_type(flux_path):
    from pipequant import QuantizationConfigError

    with pytest.raises(QuantizationConfigError, match="quant_type"):
        estimate(flux_path, PipelineQuantizationConfig(quant_mapping={"transformer": GGUFQuantizationConfig()}))


def test_t5_component_estimate_matches_at_float16(flux_path):
    """T5's `wo` stays float32 at float16 (transformers' rule) and its quantization is skipped."""
    folder = flux_path / "text_encoder_2"
    config = BitsAndBytesConfig(load_in_8bit=True)
    model = load_model(T5EncoderModel, folder, config, torch.float16)
    _assert_close(
        [estimate_component("t5", T5EncoderModel, folder, config, torch.float16)], [component_memory("t5", model)]
    )
