"""The .gguf file: a validating header parser (`header`), the memory-mapped reader that serves a model's
tensors (`reader`), the writer (`writer`), pipequant's own metadata keys (`metadata`), the BFL tensor names
other GGUF tools use for Flux (`flux_names`), and loading a model from / saving one to a file (`loading`,
`saving`). The GGUF quantization backend and its codecs live in `pipequant.backends.gguf`."""
