"""The layout rules the code base keeps: shipped code apart from demo and test code, the pipeline behind the
draft-kind seam, the trainer process without SGLang, and the draft-kind registry."""
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer.draft_kind import get_kind, kind_for_architectures, kind_for_draft, kinds

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [p for root in ("sglang_ext", "trainer", "spec_kernels") for p in (REPO / root).rglob("*.py")
           if "demo" not in p.relative_to(REPO).parts]


def _imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_shipped_code_never_imports_demo_or_test_code():
    assert len(SHIPPED) > 20
    test_modules = {p.stem for p in (REPO / "tests").rglob("*.py")} | {"tests", "support"}
    bad = {}
    for path in SHIPPED:
        for mod in _imported_modules(path):
            top = mod.split(".")[0]
            if mod == "sglang_ext.demo" or mod.startswith("sglang_ext.demo.") or top in test_modules:
                bad.setdefault(str(path.relative_to(REPO)), []).append(mod)
    assert not bad, bad


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Shipped module -> the shipped modules it imports anywhere in its source (top level, inside functions, and
    under TYPE_CHECKING: every import a reader has to follow)."""
    modules = {module_name(p): p for p in SHIPPED}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                edges |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {m for m in edges if m in modules} - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_import_cycle_finder_finds_cycles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_shipped_modules():
    """Shipped code reads in one direction: no module is in an import circle (the online path, the plugin, the
    trainer, the kernels; the offline verify simulator lives in trainer.verify_sim, below both the draft kinds
    and the evaluator, which alone reaches up to the launcher)."""
    graph = import_graph()
    assert any(m.startswith("sglang_ext.online.") for m in graph) and "trainer.verify_sim" in graph
    assert import_cycles(graph) == []


# Which sub-package of sglang_ext.online may import which: each is the code of one process (scheduler, recorder,
# trainer) or what two of them share (swap); the modules at the top level are read by every process.
ONLINE = "sglang_ext.online"
MAY_IMPORT = {"scheduler": {"scheduler", "swap", ""}, "recorder": {"recorder", "swap", ""},
              "trainer": {"trainer", "swap", ""}, "swap": {"swap", ""}, "": {""}}


def online_part(module: str) -> str | None:
    """"scheduler" / "recorder" / "trainer" / "swap" for a module of that sub-package, "" for a top-level module
    of sglang_ext.online, None outside it."""
    if module != ONLINE and not module.startswith(ONLINE + "."):
        return None
    rest = module[len(ONLINE) + 1:].split(".")
    return rest[0] if len(rest) > 1 or rest[0] in MAY_IMPORT else ""


def test_online_imports_follow_the_process_boundaries():
    """A reader knows from the folder which process runs a module: the recorder and the trainer never import the
    scheduler's code (nor each other's), the shared parts import no process's code."""
    graph = import_graph()
    bad = []
    for module, edges in graph.items():
        part = online_part(module)
        if part is None or module == ONLINE:
            continue
        for dep in edges:
            dep_part = online_part(dep)
            if dep_part is not None and dep != ONLINE and dep_part not in MAY_IMPORT[part]:
                bad.append(f"{module} -> {dep}")
    assert not bad, bad
    assert {online_part(m) for m in graph} >= {"scheduler", "recorder", "trainer", "swap", ""}


def test_online_files_stay_readable():
    """No file of sglang_ext/online/ over about 400 lines (450 at most)."""
    long = {str(p.relative_to(REPO)): n for p in (REPO / "sglang_ext" / "online").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_pipeline_names_no_draft_kind():
    """finetune, the evaluator and the online path go through trainer.draft_kind, never DFlash by name."""
    files = [REPO / "trainer" / "finetune.py", REPO / "trainer" / "evaluate.py",
             *sorted((REPO / "sglang_ext" / "online").rglob("*.py"))]
    hits = [f"{p.relative_to(REPO)}:{i}" for p in files for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"DFlashDraft|dflash_loss", line)]
    assert not hits, hits


BLOCK_SGLANG = r"""
import importlib, importlib.abc, sys
class NoSGLang(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "sglang" or name.startswith("sglang."):
            raise ImportError(f"blocked for this test: {name}")
sys.meta_path.insert(0, NoSGLang())
import pkgutil, sglang_ext.online
for part in ("recorder", "trainer", "swap"):
    package = importlib.import_module(f"sglang_ext.online.{part}")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"sglang_ext.online.{part}.{info.name}")
import sglang_ext.online.protocol, sglang_ext.online.finished, sglang_ext.online.ring, sglang_ext.online.config
import sglang_ext.online.scheduler.handoff, sglang_ext.online.scheduler.capture, sglang_ext.online.scheduler.placement
import trainer.finetune, trainer.train_step
assert not any(m == "sglang" or m.startswith("sglang.") for m in sys.modules), sorted(sys.modules)
print("OK")
"""


def test_trainer_and_recorder_processes_import_without_sglang():
    proc = subprocess.run([sys.executable, "-c", BLOCK_SGLANG], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_registry_finds_the_kind_from_the_config(tmp_path):
    dflash = get_kind("dflash")
    assert "dflash" in kinds() and kind_for_architectures(["DFlashDraftModel"]) is dflash
    cfg = dflash.config_for_target({"text_config": {"hidden_size": 64, "num_hidden_layers": 6, "vocab_size": 100,
                                                    "num_attention_heads": 4, "intermediate_size": 128}},
                                   num_layers=2, block_size=4, mask_token_id=99)
    assert cfg.target_layer_ids == [1, 3] and dflash.feature_layers(cfg) == [1, 3]
    draft_dir = dflash.from_scratch(cfg, seed=0).export(tmp_path / "draft", dtype=torch.float32)
    assert kind_for_draft(draft_dir) is dflash
    assert dflash.server_args(draft_dir, 4) == ["--speculative-algorithm", "DFLASH", "--speculative-draft-model-path",
                                                str(draft_dir), "--speculative-num-draft-tokens", "4"]
    assert dflash.sglang_param_name("layers.0.self_attn.k_proj.weight") == "layers.0.self_attn.qkv_proj.weight"
    assert dflash.sglang_param_name("fc.weight") == "fc.weight"

    bad = tmp_path / "other"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["MedusaModel"]}))
    with pytest.raises(ValueError, match=r"other/config.json: architectures \['MedusaModel'\] is not a draft kind"):
        kind_for_draft(bad)
    (bad / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ValueError, match="no 'architectures' list"):
        kind_for_draft(bad)
    with pytest.raises(FileNotFoundError, match="draft config not found"):
        kind_for_draft(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown draft kind 'medusa'"):
        get_kind("medusa")
