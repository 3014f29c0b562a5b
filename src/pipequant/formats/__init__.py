"""File formats pipequant reads and writes besides diffusers' own folders (safetensors shards are
`checkpoint.py`'s): today the single-file GGUF format of llama.cpp, stable-diffusion.cpp and ComfyUI-GGUF."""
