"""Which classes a `model_index.json` may name: the only code a pipeline folder gets to choose.

An index is untrusted input, and resolving ``["library", "Class"]`` imports ``library``: any
module's import-time code would run. So only the model libraries are imported (diffusers and
transformers, plus libraries the user trusts explicitly with `allow_library`), and the class must
be one of the kinds a pipeline is made of: a diffusers or transformers model (built by pipequant
and filled by its own safetensors reader), a scheduler, a tokenizer, or a feature extractor,
image processor or processor. Loader classes such as ``transformers.AutoModel`` are none of
these: their ``from_pretrained`` picks what to read (``pytorch_model.bin``, a pickle, included),
so they are refused.
"""

from __future__ import annotations

import importlib
from pathlib import Path

#: libraries whose classes an index may name; extend with `allow_library`
_ALLOWED_LIBRARIES = {"diffusers", "transformers"}


class PipelineFolderError(ValueError):
    """A path or repo id that is not a usable diffusers pipeline."""


def allow_library(name: str) -> None:
    """Let `model_index.json` files name classes of the library `name` (an importable module).

    Trust it only if you trust its import-time code: loading any folder that names it imports it.
    Its classes must still be models, schedulers, tokenizers or processors built on diffusers'
    and transformers' base classes.
    """
    if not name.isidentifier():
        raise ValueError(f"{name!r} is not a top-level module name.")
    _ALLOWED_LIBRARIES.add(name)


def _component_kinds() -> tuple[type, ...]:
    import diffusers
    import transformers

    return (
        diffusers.ModelMixin,
        transformers.PreTrainedModel,
        diffusers.SchedulerMixin,
        transformers.PreTrainedTokenizerBase,
        transformers.FeatureExtractionMixin,
        transformers.ImageProcessingMixin,
        transformers.ProcessorMixin,
    )


def component_class(library: str, class_name: str, *, component: str, index_path: Path) -> type:
    """The class `index_path` names for `component`, once checked to be one a pipeline may hold."""
    entry = f"{component!r} ([{library!r}, {class_name!r}])"
    if library not in _ALLOWED_LIBRARIES:
        raise PipelineFolderError(
            f"{index_path} names component {entry} from {library!r}, which pipequant does not import: only "
            f"{', '.join(sorted(_ALLOWED_LIBRARIES))} (a pipeline folder must not choose code to run). If you trust "
            f"{library!r}, call pipequant.allow_library({library!r}) first."
        )
    try:
        cls = getattr(importlib.import_module(library), class_name)
    except (ImportError, AttributeError) as error:
        raise PipelineFolderError(
            f"{index_path} says component {entry} is {library}.{class_name}, which cannot be imported "
            f"({error}). Install or upgrade {library!r}."
        ) from error
    if not isinstance(cls, type) or not issubclass(cls, _component_kinds()):
        raise PipelineFolderError(
            f"{index_path} names component {entry}, which is not a model, scheduler, tokenizer or processor class "
            "(loader classes such as AutoModel choose their own files, pickles included). Name the component's "
            "concrete class, as diffusers' save_pretrained writes it."
        )
    return cls


def pipeline_class(class_name: str, *, index_path: Path | None = None) -> type:
    """The diffusers pipeline class called `class_name` (the one `index_path` names, where given)."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    named = f"{index_path} names pipeline class {class_name!r}" if index_path is not None else repr(class_name)
    if cls is None:
        raise PipelineFolderError(
            f"{named}, which this diffusers ({diffusers.__version__}) does not have. Check the name, or upgrade "
            "diffusers."
        )
    if not isinstance(cls, type) or not issubclass(cls, diffusers.DiffusionPipeline):
        raise PipelineFolderError(f"{named}, which is not a pipeline class.")
    return cls
