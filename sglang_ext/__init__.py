"""sglang-ext: an SGLang plugin that trains the speculative-decoding draft from live traffic."""
__version__ = "0.1.0"
