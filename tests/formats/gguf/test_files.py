"""GGUF files through the public API: export, loading back (ours and other tools' files), the layouts other
tools read, atomic writes, errors naming the problem, memory while loading."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers import GGUFQuantizationConfig as DiffusersGGUFConfig
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType
from torch import nn
from typer.testing import CliRunner

from pipequant import (
    CheckpointError,
    GGUFQuantizationConfig,
    PipelineQuantizationConfig,
    QuantizationConfigError,
    QuantoConfig,
    export_gguf,
    load_model,
    load_pipeline,
    quantize_model,
    save_gguf,
    save_model,
    save_pipeline,
)
from pipequant.backends.gguf import GGUFLinear, GGUFTypeFallbackWarning, type_fallbacks
from pipequant.cli import app
from pipequant.formats.gguf.writer import StoredTensor
from pipequant.page_cache import page_residency
from pipequant.testing.memory import anonymous_bytes, mapped_rss, resident_pages

BF16 = torch.bfloat16
#: the mixed config the export tests write: per-layer rules, a fallback (x_embedder has 64 inputs), a kept layer
MIXED = GGUFQuantizationConfig(
    quant_type="Q8_0",
    compute_dtype=BF16,
    type_rules={"*.ff.net.2": "Q4_K", "x_embedder": "Q6_K"},
    modules_to_not_convert=["norm_out"],
)


def gguf_layers(model: nn.Module) -> dict[str, GGUFLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, GGUFLinear)}


def assert_same_model(ours: nn.Module, theirs: nn.Module) -> None:
    """Same GGUF layers (type, requested type, bytes) and the same tensors, dtype for dtype."""
    ours_layers, theirs_layers = gguf_layers(ours), gguf_layers(theirs)
    assert ours_layers.keys() == theirs_layers.keys()
    for name, layer in ours_layers.items():
        other = theirs_layers[name]
        assert (layer.ggml_type, layer.requested_type, layer.compute_dtype) == (
            other.ggml_type,
            other.requested_type,
            other.compute_dtype,
        ), name
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert ours_state.keys() == theirs_state.keys()
    for key, tensor in ours_state.items():
        assert tensor.dtype == theirs_state[key].dtype and torch.equal(tensor, theirs_state[key]), key


def rewrite(source: Path, target: Path, *, prefix: str = "", rename: dict[str, str] | None = None, retype=None) -> Path:
    """`source` as another tool writes it: tensors only (no pipequant metadata), optionally renamed or retyped."""
    reader = GGUFReader(source)
    writer = GGUFWriter(target, arch="flux")
    for tensor in reader.tensors:
        name = (rename or {}).get(tensor.name, tensor.name)
        data, qtype = (tensor.data, tensor.tensor_type) if retype is None or name != retype[0] else retype[1:]
        writer.add_tensor(prefix + name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


@pytest.fixture(scope="module")
def mixed_pipeline(flux_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GGUFTypeFallbackWarning)
        return load_pipeline(
            flux_path,
            quantization_config=PipelineQuantizationConfig(quant_mapping={"transformer": MIXED}),
            torch_dtype=BF16,
        )


@pytest.fixture(scope="module")
def mixed_image(mixed_pipeline, generate):
    return generate(mixed_pipeline)


@pytest.fixture(scope="module")
def exported(mixed_pipeline, tmp_path_factory) -> Path:
    return save_gguf(mixed_pipeline.transformer, tmp_path_factory.mktemp("gguf") / "transformer-mixed.gguf")


@pytest.fixture(scope="module")
def community_file(exported, tmp_path_factory) -> Path:
    """The export as the community Flux files are: BFL names under the checkpoint prefix, no pipequant keys."""
    return rewrite(exported, tmp_path_factory.mktemp("gguf") / "community.gguf", prefix="model.diffusion_model.")


# --- export and loading back ----------------------------------------------------------------------


def test_export_loads_back_identically_with_load_model(mixed_pipeline, exported):
    model = load_model(FluxTransformer2DModel, exported)  # the architecture and config come from the file
    assert_same_model(model, mixed_pipeline.transformer)
    assert model.pipequant_record.config == mixed_pipeline.transformer.pipequant_record.config
    assert type_fallbacks(model) == {"x_embedder": ("Q6_K", "Q8_0")}
    assert type(model.norm_out.linear) is nn.Linear


def test_export_loads_back_in_a_pipeline_with_identical_output(flux_path, exported, mixed_image, generate):
    pipe = load_pipeline(flux_path, transformer=str(exported), torch_dtype=BF16)
    assert np.array_equal(generate(pipe), mixed_image)


def test_flux_is_written_in_the_layout_comfyui_gguf_and_sd_cpp_load(mixed_pipeline, exported):
    reader = GGUFReader(exported)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert reader.get_field("general.architecture").contents() == "flux"  # ComfyUI-GGUF's IMG_ARCH_LIST
    assert reader.get_field("general.file_type").contents() == LlamaFileType.MOSTLY_Q8_0
    assert reader.get_field("general.quantization_version").contents() == 2
    # ComfyUI-GGUF's converter detects Flux by the first name and refuses the second (diffusers' layout);
    # stable-diffusion.cpp prefixes model.diffusion_model. and looks for double_blocks.
    assert "double_blocks.0.img_attn.proj.weight" in tensors
    assert not any(name.startswith(("transformer_blocks.", "single_transformer_blocks.")) for name in tensors)

    transformer = mixed_pipeline.transformer
    qkv = tensors["double_blocks.1.img_attn.qkv.weight"]
    parts = [transformer.get_submodule(f"transformer_blocks.1.attn.to_{x}").weight for x in "qkv"]
    assert qkv.tensor_type == GGMLQuantizationType.Q8_0
    assert np.array_equal(qkv.data, torch.cat(parts).numpy())  # rows stacked as they are, not re-quantized
    linear1 = tensors["single_blocks.0.linear1.weight"]
    assert [int(d) for d in linear1.shape] == [128, 3 * 128 + 512]
    modulation = tensors["final_layer.adaLN_modulation.1.weight"]
    scale, shift = transformer.norm_out.linear.weight.float().chunk(2)
    assert modulation.tensor_type == GGMLQuantizationType.BF16  # kept in full precision
    stored = torch.from_numpy(np.array(modulation.data)).view(BF16).float()
    assert torch.equal(stored, torch.cat([shift, scale]))  # BFL stores (shift, scale)
    assert tensors["img_in.weight"].tensor_type == GGMLQuantizationType.Q8_0  # Q6_K fell back
    assert tensors["double_blocks.0.img_mlp.2.weight"].tensor_type == GGMLQuantizationType.Q4_K
    assert {tensors[name].tensor_type for name in tensors if len(tensors[name].shape) == 1} == {
        GGMLQuantizationType.F32
    }
    assert {"pipequant.model_config", "pipequant.quantization_config"} <= set(reader.fields)


def _module_holding(state: dict[str, torch.Tensor]) -> nn.Module:
    """A bare module tree whose parameters are `state`, named as its keys."""
    root = nn.Module()
    for name, tensor in state.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.register_parameter(leaf, nn.Parameter(tensor, requires_grad=False))
    return root


def test_bfl_names_and_row_order_are_diffusers_own_conversion_inverted(tmp_path):
    """Written in the BFL layout and read back by diffusers' converter, at the proportions it hard-codes
    (hidden 3072, mlp 12288), one column wide."""
    config = {"num_layers": 2, "num_single_layers": 2, "attention_head_dim": 128, "num_attention_heads": 24}
    with torch.device("meta"):
        names = list(FluxTransformer2DModel(guidance_embeds=True, **config).state_dict())
    rows = {"to_q": 3072, "to_k": 3072, "to_v": 3072, "proj_mlp": 12288, "norm_out": 2 * 3072}
    torch.manual_seed(0)
    state = {}
    for name in names:
        count = next((n for key, n in rows.items() if f"{key}." in name or name.startswith(key)), 4)
        state[name] = torch.randn(count, 1) if name.endswith("weight") else torch.randn(count)
    path = save_gguf(_module_holding(state), tmp_path / "flux-proportions.gguf", layout="bfl")
    bfl = {t.name: torch.from_numpy(np.array(t.data)) for t in GGUFReader(path).tensors}
    bfl = {name: t if name.endswith((".bias", ".scale")) else t.reshape(-1, 1) for name, t in bfl.items()}
    converted = convert_flux_transformer_checkpoint_to_diffusers(bfl)
    assert converted.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(converted[name], tensor), name


def test_a_community_bfl_file_loads_into_diffusers_layout(
    flux_path, mixed_pipeline, community_file, mixed_image, generate
):
    reader = GGUFReader(community_file)
    assert not [key for key in reader.fields if key.startswith("pipequant.")]
    assert any(t.name.startswith("model.diffusion_model.double_blocks.") for t in reader.tensors)
    config = GGUFQuantizationConfig(compute_dtype=BF16)
    model = load_model(
        FluxTransformer2DModel, community_file, config, torch_dtype=BF16, config_folder=flux_path / "transformer"
    )
    ours, theirs = gguf_layers(model), gguf_layers(mixed_pipeline.transformer)
    assert ours.keys() == theirs.keys()
    for name, layer in ours.items():
        assert layer.ggml_type == theirs[name].ggml_type and torch.equal(layer.weight, theirs[name].weight), name
    assert model.state_dict().keys() == mixed_pipeline.transformer.state_dict().keys()

    pipe = load_pipeline(
        flux_path,
        transformer=community_file,
        quantization_config=PipelineQuantizationConfig(quant_mapping={"transformer": config}),
        torch_dtype=BF16,
    )
    assert np.array_equal(generate(pipe), mixed_image)


def test_diffusers_layout_export_loads_back_and_opens_in_diffusers(flux_path, tmp_path):
    model = load_model(
        FluxTransformer2DModel,
        flux_path / "transformer",
        GGUFQuantizationConfig(quant_type="Q8_0"),
        torch_dtype=torch.float32,
    )
    path = save_gguf(model, tmp_path / "diffusers-layout.gguf", layout="diffusers")
    reader = GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "pipequant"
    assert "transformer_blocks.0.attn.to_q.weight" in {t.name for t in reader.tensors}
    assert_same_model(load_model(FluxTransformer2DModel, path), model)

    theirs = FluxTransformer2DModel.from_single_file(
        str(path),
        config=str(flux_path),
        subfolder="transformer",
        quantization_config=DiffusersGGUFConfig(compute_dtype=torch.float32),
    )
    torch.manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64),
        encoder_hidden_states=torch.randn(1, 8, 256),
        pooled_projections=torch.randn(1, 256),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5]),
    )
    with torch.no_grad():
        ours_out, theirs_out = model(**inputs).sample, theirs(**inputs).sample
    # diffusers dequantizes Q8_0 in float16; the bytes and layers are the same
    assert (ours_out - theirs_out).abs().max() < 0.01 * ours_out.abs().mean()


def test_gguf_pipeline_saves_to_a_folder_and_loads_back(mixed_pipeline, mixed_image, generate, tmp_path):
    folder = save_pipeline(mixed_pipeline, tmp_path / "saved")
    pipe = load_pipeline(folder, torch_dtype=BF16)
    assert_same_model(pipe.transformer, mixed_pipeline.transformer)
    assert np.array_equal(generate(pipe), mixed_image)


def test_export_is_atomic_and_refuses_to_overwrite(flux_path, exported, tmp_path):
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        save_gguf(nn.Linear(2, 2), exported)
    config = GGUFQuantizationConfig(quant_type="Q8_0", type_rules={"to_q": "Q4_0"})
    model = load_model(FluxTransformer2DModel, flux_path / "transformer", config)
    target = tmp_path / "out" / "t.gguf"
    target.parent.mkdir()
    with pytest.raises(ValueError, match="stacks .*to_q.*to_k.*to_v.* into one tensor.*layout='diffusers'"):
        save_gguf(model, target)
    assert list(target.parent.iterdir()) == []
    save_gguf(model, target, layout="diffusers")
    assert [p.name for p in target.parent.iterdir()] == ["t.gguf"]


# Runs in a fresh interpreter: overwrites a .gguf file and is killed (SIGKILL) while writing its tensors.
KILLED_EXPORT = """
import os, signal, sys
from diffusers import FluxTransformer2DModel
from gguf import GGUFWriter
from pipequant import load_model, save_gguf

source, target = sys.argv[1:]
model = load_model(FluxTransformer2DModel, source)
GGUFWriter.write_tensor_data = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
save_gguf(model, target, overwrite=True)
"""


def test_a_killed_export_keeps_the_file_and_the_next_one_cleans_up(exported, tmp_path):
    target = tmp_path / "t.gguf"
    target.write_bytes(exported.read_bytes())
    run = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(exported), str(target)], timeout=300)
    assert run.returncode == -9
    assert target.read_bytes() == exported.read_bytes()
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".t.gguf.saving-") and leftovers[0].endswith(".tmp")
    save_gguf(load_model(FluxTransformer2DModel, exported), target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["t.gguf"]


def test_a_failed_write_is_raised_and_leaves_nothing(exported, tmp_path, monkeypatch):
    """The tensors are written from a thread of their own: its error (here a full disk) reaches the caller, and
    neither the file nor a temporary is left."""
    written = []

    def write_tensor_data(self, tensor, *args, **kwargs):
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        written.append(tensor.nbytes)

    monkeypatch.setattr(GGUFWriter, "write_tensor_data", write_tensor_data)
    with pytest.raises(OSError, match="No space left"):
        save_gguf(load_model(FluxTransformer2DModel, exported), tmp_path / "t.gguf")
    assert len(written) == 3 and list(tmp_path.iterdir()) == []


# --- clear errors ---------------------------------------------------------------------------------


def test_truncated_or_corrupt_files_are_named(exported, tmp_path):
    data = exported.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.gguf: not a readable GGUF file .* truncated or corrupt"):
        load_model(FluxTransformer2DModel, truncated)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUX" + data[4:])
    with pytest.raises(CheckpointError, match="corrupt.gguf: not a readable GGUF file"):
        load_model(FluxTransformer2DModel, corrupt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(FluxTransformer2DModel, tmp_path / "missing.gguf")


def test_a_type_pipequant_cannot_read_is_named(community_file, flux_path, tmp_path):
    iq4 = np.zeros((128, 64 // 32 * 18), dtype=np.uint8)  # IQ4_NL: 32 weights in 18 bytes
    path = rewrite(
        community_file,
        tmp_path / "iq4.gguf",
        retype=("model.diffusion_model.img_in.weight", iq4, GGMLQuantizationType.IQ4_NL),
    )
    with pytest.raises(CheckpointError, match="'model.diffusion_model.img_in.weight' \\(IQ4_NL\\).*Supported types"):
        load_model(FluxTransformer2DModel, path, config_folder=flux_path / "transformer")


def test_tensor_names_that_do_not_fit_the_model_are_named(community_file, flux_path, tmp_path):
    path = rewrite(
        community_file,
        tmp_path / "renamed.gguf",
        rename={"model.diffusion_model.txt_in.weight": "model.diffusion_model.txt_input.weight"},
    )
    with pytest.raises(CheckpointError, match="missing 1 keys.*context_embedder.weight.*txt_input.weight"):
        load_model(FluxTransformer2DModel, path, config_folder=flux_path / "transformer")


def test_configs_that_contradict_a_gguf_file_are_refused(community_file, exported, flux_path):
    folder = flux_path / "transformer"
    with pytest.raises(
        QuantizationConfigError, match="already quantized \\(.*Q8_0: 33 tensors.*leave them out for a .gguf file"
    ):
        load_model(
            FluxTransformer2DModel, community_file, GGUFQuantizationConfig(quant_type="Q4_K"), config_folder=folder
        )
    load_model(FluxTransformer2DModel, exported, MIXED)  # the config the file was written with is fine
    with pytest.raises(
        QuantizationConfigError, match="modules_to_not_convert names layers .* holds quantized \\(proj_out"
    ):
        load_model(FluxTransformer2DModel, exported, GGUFQuantizationConfig(modules_to_not_convert=["proj_out"]))
    with pytest.raises(QuantizationConfigError, match="must be a GGUFQuantizationConfig"):
        load_model(FluxTransformer2DModel, exported, DiffusersGGUFConfig())
    with pytest.raises(CheckpointError, match="carries no model config .* pass config_folder="):
        load_model(FluxTransformer2DModel, community_file)


# --- memory -----------------------------------------------------------------------------------------


def _mid_sized_flux() -> FluxTransformer2DModel:
    """A Flux transformer of about 17 M parameters: large beside what one layer costs, quick to build."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        in_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=128,
        num_attention_heads=4,
        joint_attention_dim=256,
        pooled_projection_dim=256,
        axes_dims_rope=(16, 56, 56),
    )


def test_loading_a_gguf_file_copies_one_layer_at_a_time(tmp_path):
    model = _mid_sized_flux()
    path = save_gguf(quantize_model(model, GGUFQuantizationConfig(quant_type="Q8_0")), tmp_path / "big.gguf")
    del model
    gc.collect()
    file_size = path.stat().st_size
    assert file_size > 15e6

    before = anonymous_bytes()
    peak = before

    def on_layer(done: int, total: int) -> None:
        nonlocal peak
        peak = max(peak, anonymous_bytes())

    loaded = load_model(FluxTransformer2DModel, path, on_layer=on_layer)
    # the model itself is about the file's size; one copy of the whole file on top would double it
    assert peak - before < 1.4 * file_size
    for name, layer in gguf_layers(loaded).items():  # its own memory, not a view of a larger read (the aligned
        # blocks around it, or a reused read buffer up to a quarter larger)
        assert layer.weight.untyped_storage().nbytes() <= 1.25 * layer.weight.nbytes + 8192, name


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_a_gguf_load_maps_nothing_and_leaves_the_page_cache_as_it_found_it(exported, community_file, flux_path):
    """As safetensors shards: read into owned memory (no file page in RSS); a file not cached is not cached by
    the load, a cached one stays cached; the BFL file's fused tensors are read as row ranges."""
    page = os.sysconf("SC_PAGE_SIZE")
    for path in (exported, community_file):
        with open(path, "rb") as file:
            os.fsync(file.fileno())  # the kernel drops only clean pages
            os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        model = load_model(FluxTransformer2DModel, path, config_folder=flux_path / "transformer")
        assert gguf_layers(model) and mapped_rss(path.resolve()) == 0
        cached = page_residency(path)
        whole_pages = [  # pages that lie wholly inside a tensor's bytes (the kernel drops whole pages only)
            index
            for tensor in GGUFReader(path).tensors
            for index in range(-(-tensor.data_offset // page), (tensor.data_offset + tensor.n_bytes) // page)
        ]
        assert len(whole_pages) > 0.5 * path.stat().st_size / page
        # mostly: this tiny file's pieces are a few pages each, read out of file order (q, k, v of one fused
        # tensor), and the kernel's own read-ahead for one piece may bring back pages of another already read
        assert sum(cached[index] for index in whole_pages) < 0.25 * len(whole_pages)

        path.read_bytes()  # the whole file cached, as by a load a moment ago
        load_model(FluxTransformer2DModel, path, config_folder=flux_path / "transformer")
        assert resident_pages(path) * page >= path.stat().st_size - page


@pytest.mark.parametrize("layout", ["auto", "diffusers"])
@pytest.mark.parametrize("dtype", [BF16, None])
def test_a_streamed_export_is_the_file_save_gguf_writes_after_a_load(flux_path, layout, dtype, tmp_path):
    """export_gguf never holds the model, and writes the same bytes: types, fallbacks, plain dtypes, metadata."""
    folder = flux_path / "transformer"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GGUFTypeFallbackWarning)
        loaded = load_model(FluxTransformer2DModel, folder, MIXED, torch_dtype=dtype)
        saved = save_gguf(loaded, tmp_path / "saved.gguf", layout=layout)
        streamed = export_gguf(
            FluxTransformer2DModel, folder, MIXED, tmp_path / "streamed.gguf", torch_dtype=dtype, layout=layout
        )
    assert type_fallbacks(loaded)  # the config's fallbacks are part of what must agree
    assert streamed.read_bytes() == saved.read_bytes()


def test_a_streamed_export_refuses_what_it_cannot_write_before_reading(flux_path, tmp_path):
    folder = flux_path / "transformer"
    with pytest.raises(QuantizationConfigError, match="no quant_type"):
        export_gguf(FluxTransformer2DModel, folder, GGUFQuantizationConfig(), tmp_path / "a.gguf")
    with pytest.raises(QuantizationConfigError, match="not QuantoConfig"):
        export_gguf(FluxTransformer2DModel, folder, QuantoConfig(), tmp_path / "a.gguf")
    saved = save_model(load_model(FluxTransformer2DModel, folder, MIXED), tmp_path / "saved")
    with pytest.raises(QuantizationConfigError, match="saved already quantized"):
        export_gguf(FluxTransformer2DModel, saved, MIXED, tmp_path / "a.gguf")
    with pytest.raises(ValueError, match="ends in .gguf"):
        export_gguf(FluxTransformer2DModel, folder, MIXED, tmp_path / "a.safetensors")
    assert not list(tmp_path.glob("*.gguf*"))


def test_a_streamed_export_reads_one_layer_at_a_time(tmp_path):
    """Anonymous memory while exporting stays far below the model's size (the loaded route holds all of it)."""
    model = _mid_sized_flux()
    model.save_pretrained(tmp_path / "transformer")
    model_bytes = sum(t.nbytes for t in model.state_dict().values())
    del model
    gc.collect()
    before = anonymous_bytes()
    peak = before
    original = StoredTensor.materialize

    def sampled(self):
        nonlocal peak
        data = original(self)
        peak = max(peak, anonymous_bytes())
        return data

    config = GGUFQuantizationConfig(quant_type="Q8_0")
    try:
        StoredTensor.materialize = sampled
        export_gguf(FluxTransformer2DModel, tmp_path / "transformer", config, tmp_path / "out.gguf")
    finally:
        StoredTensor.materialize = original
    assert model_bytes > 60e6
    assert peak - before < 0.25 * model_bytes


# --- command line ------------------------------------------------------------------------------------


def test_cli_quantize_writes_a_gguf_file_that_loads(flux_path, tmp_path):
    out = tmp_path / "transformer-q8.gguf"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "quantize",
            str(flux_path),
            "--backend",
            "gguf",
            "--type",
            "Q8_0",
            "--out",
            str(out),
            "--rule",
            "*.ff.net.2=Q4_K",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Wrote transformer" in result.output
    model = load_model(FluxTransformer2DModel, out)
    assert model.transformer_blocks[0].ff.net[2].ggml_type == "Q4_K"
    assert model.transformer_blocks[0].attn.to_q.ggml_type == "Q8_0"

    refused = runner.invoke(
        app,
        ["quantize", str(flux_path), "--backend", "quanto", "--type", "Q8_0", "--out", str(out)],
        env={"COLUMNS": "300"},
    )
    assert refused.exit_code == 2 and "a .gguf file holds GGUF blocks" in refused.output
