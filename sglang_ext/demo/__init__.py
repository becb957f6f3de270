"""Demo code, apart from the shipped plugin: the online demo (`python -m sglang_ext.demo`, the README's main
job), a static demo (`python -m sglang_ext.demo.static`), the reference workload (`workload/`: a tiny Qwen3-VL
trained here, with prompt sets), tiny offline models (`tiny_models`), prompts and traffic helpers.

Tests and benchmarks use these too. Nothing outside this package (the plugin, `trainer`, `spec_kernels`)
imports from it.
"""
