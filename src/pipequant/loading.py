"""Load a diffusers pipeline folder, quantizing chosen components while their weights stream in.

The flow goes one way: resolve the folder, read `model_index.json`, resolve and validate the
quantization config per component (before any weight is read), then load each component —
tokenizers, schedulers and processors with their own `from_pretrained`, every model (quantized or
not) by streaming (see `streaming.py`) — and assemble the pipeline class the index names. Which
classes an index may name is `component_classes.py`'s rule.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import recover
from .backends import backend_for
from .backends.base import BackendConfig
from .checkpoint import CheckpointError, ComponentCheckpoint
from .component_classes import PipelineFolderError, component_class, pipeline_class
from .config import PipelineQuantizationConfig, as_pipeline_config
from .devices import check_device, roomiest_gpu
from .formats.gguf.loading import is_gguf_file, load_gguf_model
from .load_options import HubOptions, take_load_options, unknown_keywords_error
from .quantizing import quantize_model
from .restoring import saved_config
from .streaming import build_empty_model, count_layers, stored_shapes, stream_model
from .ui import ProgressCallback, progress_bars


@dataclasses.dataclass
class PipelineIndex:
    """What `model_index.json` says: the pipeline class and, per component, its library and class."""

    folder: Path
    pipeline_class_name: str
    components: dict[str, tuple[str, str] | None]
    settings: dict[str, Any]

    def component_class(self, name: str) -> type | None:
        entry = self.components[name]
        return None if entry is None else component_class(*entry, component=name, index_path=self.index_path)

    @property
    def index_path(self) -> Path:
        return self.folder / "model_index.json"

    def split_components(self) -> tuple[list[str], list[str]]:
        """(torch-model components, other components such as tokenizers and schedulers)."""
        models, others = [], []
        for name in self.components:
            cls = self.component_class(name)
            if cls is None:
                continue
            (models if issubclass(cls, nn.Module) else others).append(name)
        return models, others


def resolve_pipeline_folder(path_or_repo_id: str | Path, hub: HubOptions | None = None) -> Path:
    """A local folder as is; anything else is a Hub repo id, fetched (or found in the cache) by huggingface_hub.

    `hub` carries from_pretrained's revision, cache_dir, token and local_files_only for the download,
    and `subfolder`, the pipeline's folder inside the repo or local folder.
    """
    hub = hub or HubOptions()
    subfolder = hub.subfolder.strip("/") if hub.subfolder else ""
    path = Path(path_or_repo_id).expanduser()
    recover(path)  # what a killed save_pipeline left beside it
    if path.is_dir():
        return _subfolder(path, subfolder)
    if path.exists() or str(path_or_repo_id).count("/") != 1:
        raise PipelineFolderError(
            f"{path_or_repo_id!r} is neither a pipeline folder nor a Hub repo id of the form 'owner/name'."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [f"{subfolder}/{pattern}" if subfolder else pattern for pattern in _HUB_PATTERNS]
    try:
        folder = snapshot_download(
            str(path_or_repo_id),
            allow_patterns=patterns,
            revision=hub.revision,
            cache_dir=hub.cache_dir,
            token=hub.token,
            local_files_only=hub.local_files_only,
        )
        return _subfolder(Path(folder), subfolder)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        raise PipelineFolderError(
            f"{path_or_repo_id!r} is not a local folder, and fetching it from the Hub failed ({error}). "
            "Check the repo id, your network and HF token, or pass a local folder."
        ) from error


#: the files a pipeline needs: configs, tokenizer files, weights (never pickles); huggingface_hub's `*` spans folders
_HUB_PATTERNS = ("*.json", "*.txt", "*.model", "*.safetensors", "*.gguf")


def _subfolder(folder: Path, subfolder: str) -> Path:
    if not subfolder:
        return folder
    inside = folder / subfolder
    if ".." in Path(subfolder).parts or not inside.is_dir():
        raise PipelineFolderError(f"subfolder={subfolder!r} is not a folder inside {folder}.")
    return inside


def read_pipeline_index(folder: str | Path) -> PipelineIndex:
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise PipelineFolderError(
            f"{folder} has no model_index.json, so it is not a diffusers pipeline folder. "
            "For a single model use pipequant.load_model."
        )
    try:
        raw = json.loads(index_path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise PipelineFolderError(f"{index_path} is not valid JSON ({type(error).__name__}: {error}).") from error
    if not isinstance(raw, dict) or not isinstance(raw.get("_class_name"), str):
        raise PipelineFolderError(
            f'{index_path} is not a pipeline index: it must be a JSON object with the pipeline\'s "_class_name".'
        )
    components: dict[str, tuple[str, str] | None] = {}
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2 and all(item is None or isinstance(item, str) for item in value):
            components[key] = None if value[0] is None or value[1] is None else (value[0], value[1])
        else:
            settings[key] = value
    pipeline_class(raw["_class_name"], index_path=index_path)  # refused before any component is read
    return PipelineIndex(folder, raw["_class_name"], components, settings)


def load_model(
    model_class: type[nn.Module],
    folder: str | Path,
    quantization_config: BackendConfig | None = None,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    on_layer: ProgressCallback | None = None,
    *,
    config_folder: str | Path | None = None,
) -> nn.Module:
    """Load one model (a diffusers or transformers class) from its folder, quantizing while streaming.

    Without a config it is loaded by streaming too, unquantized. `torch_dtype=None` keeps the
    checkpoint's dtype. A folder saved already quantized is restored from its stored layers with
    the config saved in it; a `quantization_config` that differs from that one is an error.

    `folder` may also be a single .gguf file (see `gguf_loading.load_gguf_model`); its architecture
    comes from `config_folder`'s config.json, or from the file when pipequant wrote it.
    """
    device = check_device(device)
    recover(Path(folder))  # what a killed save_model / save_gguf left beside it
    if is_gguf_file(folder):
        return load_gguf_model(
            model_class,
            folder,
            quantization_config,
            torch_dtype=torch_dtype,
            device=device,
            on_layer=on_layer,
            config_folder=config_folder,
        )
    if config_folder is not None:
        raise TypeError("config_folder is for .gguf files; a model folder has its own config.json.")
    folder = Path(folder)
    saved = saved_config(folder, quantization_config)
    config = saved or quantization_config
    if config is not None:
        backend = backend_for(config)
        backend.require()
        backend.check_device(config, device)
    checkpoint = ComponentCheckpoint(folder)
    model = build_empty_model(model_class, folder, stored_shapes(checkpoint))
    return stream_model(
        model, checkpoint, config=config, dtype=torch_dtype, device=device, on_layer=on_layer, saved=saved is not None
    )


def load_pipeline(
    path_or_repo_id: str | Path,
    quantization_config: PipelineQuantizationConfig | Any | None = None,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    *,
    pipeline_class: type | None = None,
    **kwargs: Any,
):
    """Load a diffusers pipeline, quantizing the components `quantization_config` names as they load.

    `quantization_config` is pipequant's `PipelineQuantizationConfig` or diffusers' own. The keywords
    of diffusers' ``from_pretrained`` are taken too (``dtype``, ``device_map``, ``variant``,
    ``revision``, ``subfolder``, ``cache_dir``, ``token``, ``local_files_only``, ``use_safetensors``,
    ``low_cpu_mem_usage``; see `load_options`); any other keyword names a component.

    Components passed as keywords (``text_encoder_2=my_model``) are used as given, and quantized
    too when the config names them. A model component given as the path of a .gguf file
    (``transformer="flux1-dev-Q4_K_S.gguf"``) is loaded from it, with the component folder's
    config.json for its architecture. Components saved already quantized (by `save_pipeline`,
    diffusers or transformers) are restored from their stored layers; a config given for one of
    them must agree with the saved one. Returns the diffusers pipeline class named in the index
    (or `pipeline_class`, as ``FluxImg2ImgPipeline.from_pretrained`` on a Flux folder does in
    diffusers), with the config on its ``quantization_config`` attribute.
    """
    quantization_config = as_pipeline_config(quantization_config)
    components = {**kwargs, "torch_dtype": torch_dtype, "device": device}
    options = take_load_options(components)  # what is left in `components` names components
    folder = resolve_pipeline_folder(path_or_repo_id, options.hub)
    index = index_for_class(read_pipeline_index(folder), pipeline_class, given=set(components))
    model_names, other_names = index.split_components()
    unknown = sorted(set(components) - set(index.components))
    if unknown:
        raise unknown_keywords_error(unknown, list(index.components), index.pipeline_class_name)
    configs = quantization_config.resolve(model_names, other_names) if quantization_config is not None else {}
    gguf_files = {name: value for name, value in components.items() if is_gguf_file(value)}
    not_models = sorted(set(gguf_files) - set(model_names))
    if not_models:
        raise TypeError(
            f"{', '.join(not_models)} of {index.pipeline_class_name} are not models; a .gguf file holds a model."
        )
    gguf_configs = {name: configs.pop(name, None) for name in gguf_files}
    saved = {
        name: config
        for name in model_names
        if name not in components and (config := saved_config(folder / name, configs.get(name))) is not None
    }
    configs.update(saved)
    balanced = options.device == "balanced"
    for config in configs.values():
        backend = backend_for(config)
        backend.require()
        backend.check_device(config, torch.device("cuda", 0) if balanced else options.device)

    loaded: dict[str, Any] = {}
    placed: dict[str, int] = {}
    with progress_bars(progress) as add_task:
        for name in index.components:
            if balanced:  # models to the roomiest GPU as they come; tokenizers and schedulers hold no tensors
                target = roomiest_gpu() if name in model_names else torch.device("cpu")
            else:
                target = options.device
            dtype = options.dtype_for(name)
            if name in gguf_files:
                gguf_config = gguf_configs[name]
                loaded[name] = _load_gguf_component(index, name, gguf_files[name], gguf_config, dtype, target, add_task)
            elif name in components:
                given = components[name]
                if name in configs and isinstance(given, nn.Module):
                    given = quantize_model(given, configs[name], target)
                loaded[name] = given
            else:
                loaded[name] = _load_component(
                    index,
                    name,
                    configs.get(name),
                    dtype,
                    target,
                    add_task,
                    saved=name in saved,
                    variant=options.variant,
                )
            if balanced and name in model_names:
                placed[name] = target.index

    pipeline = _assemble(index, loaded)
    pipeline.quantization_config = quantization_config
    if balanced:
        pipeline.hf_device_map = placed  # as diffusers' device_map="balanced" records it
    return pipeline


def _load_component(
    index: PipelineIndex,
    name: str,
    config: BackendConfig | None,
    torch_dtype: torch.dtype | None,
    device: torch.device,
    add_task,
    saved: bool = False,
    variant: str | None = None,
) -> Any:
    cls = index.component_class(name)
    if cls is None:
        return None
    folder = index.folder / name
    if not issubclass(cls, nn.Module):
        return cls.from_pretrained(folder)
    # Every model is streamed, quantized or not: a missing, extra or mis-typed tensor is one error naming the
    # file and keys (diffusers' from_pretrained warns and leaves random or meta weights), and no pickle is read.
    checkpoint = ComponentCheckpoint(folder, variant)
    model = build_empty_model(cls, folder, stored_shapes(checkpoint))
    if config is None:
        # None keeps the stored dtype (diffusers alone would make it float32): a pipeline saved in bfloat16
        # comes back in bfloat16 throughout
        dtype, label = torch_dtype or checkpoint.stored_float_dtype(), name
    else:
        dtype, label = torch_dtype, f"{name} ({config.backend_name})"
    on_layer = add_task(label, count_layers(model))
    return stream_model(model, checkpoint, config=config, dtype=dtype, device=device, on_layer=on_layer, saved=saved)


def _load_gguf_component(
    index: PipelineIndex,
    name: str,
    path: str | Path,
    config: BackendConfig | None,
    torch_dtype: torch.dtype | None,
    device: torch.device,
    add_task,
) -> nn.Module:
    """A model component from a .gguf file, with its folder's config.json when the pipeline has one."""
    folder = index.folder / name
    progress = None

    def on_layer(done: int, total: int) -> None:
        nonlocal progress
        if progress is None:
            progress = add_task(f"{name} ({Path(path).name})", total)
        progress(done, total)

    return load_gguf_model(
        index.component_class(name),
        path,
        config,
        torch_dtype=torch_dtype,
        device=device,
        on_layer=on_layer,
        config_folder=folder if (folder / "config.json").is_file() else None,
    )


def index_for_class(index: PipelineIndex, pipeline_class: type | None, given: set[str]) -> PipelineIndex:
    """`index` as `pipeline_class` takes it, as diffusers' ``SomePipeline.from_pretrained`` reads a folder:
    the folder's components that class has, and None for optional ones the folder lacks.

    A component the class needs that neither the folder nor the `given` keywords provide is an error,
    raised before any weight is read. None or diffusers' `DiffusionPipeline`: the class the index names.
    """
    import diffusers

    if pipeline_class is None or pipeline_class is diffusers.DiffusionPipeline:
        return index
    expected, _ = pipeline_class._get_signature_keys(pipeline_class)
    optional = set(getattr(pipeline_class, "_optional_components", ()) or ())
    missing = sorted(set(expected) - set(index.components) - given - optional)
    if missing:
        raise PipelineFolderError(
            f"{pipeline_class.__name__} needs component(s) {', '.join(missing)}, which {index.folder} (a "
            f"{index.pipeline_class_name}) does not have; pass them as keywords, or load it with "
            f"{index.pipeline_class_name}.from_pretrained."
        )
    components = {name: index.components.get(name) for name in expected}
    return dataclasses.replace(index, pipeline_class_name=pipeline_class.__name__, components=components)


def _assemble(index: PipelineIndex, components: dict[str, Any]):
    cls = pipeline_class(index.pipeline_class_name, index_path=index.index_path)
    accepted = inspect.signature(cls.__init__).parameters
    settings = {k: v for k, v in index.settings.items() if k in accepted}
    pipeline = cls(**components, **settings)
    pipeline.register_to_config(_name_or_path=str(index.folder))
    return pipeline


def quantize_pipeline(pipeline, config: PipelineQuantizationConfig | Any, device: torch.device | str | None = None):
    """Quantize the components of an in-memory pipeline that `config` names, layer by layer, in place."""
    config = as_pipeline_config(config)
    device = None if device is None else check_device(device)  # before any layer is touched
    models = [name for name, value in pipeline.components.items() if isinstance(value, nn.Module)]
    others = [name for name, value in pipeline.components.items() if value is not None and name not in models]
    for name, component_config in config.resolve(models, others).items():
        quantize_model(getattr(pipeline, name), component_config, device)
    pipeline.quantization_config = config
    return pipeline


__all__ = [
    "CheckpointError",
    "PipelineFolderError",
    "PipelineIndex",
    "load_model",
    "load_pipeline",
    "quantize_pipeline",
    "read_pipeline_index",
    "resolve_pipeline_folder",
]
