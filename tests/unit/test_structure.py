"""The shape of the code base, checked: no import circle among our modules, product code never
imports the test harness, modules stay small enough to hold in one's head."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {  # dotted prefix -> directory
    "multimodal_dev": ROOT / "examples" / "multimodal_dev",
    "megatron.mcore_ext": ROOT / "megatron" / "mcore_ext",
}
HARNESS = "megatron.mcore_ext.testing"


def _modules() -> dict[str, Path]:
    out = {}
    for prefix, base in PACKAGES.items():
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Our modules that ``name`` imports anywhere in its file (also inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if _is_package(path) else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` names a module when pkg.sub is one of ours
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def _graph():
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_product_code_never_imports_the_test_harness():
    offenders = sorted(m for m, deps in _graph().items() if HARNESS in deps and m != HARNESS)
    assert not offenders, f"product modules importing {HARNESS}: {offenders}"


def test_no_import_circle():
    graph = _graph()
    # a package's __init__ importing its own sub-modules is how packages work, not a circle
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_modules_stay_small():
    limits = {"multimodal_dev.training": 350}
    too_long = []
    for name, path in _modules().items():
        if not name.startswith("multimodal_dev."):
            continue
        n = len(path.read_text().splitlines())
        if n > limits.get(name, 450):
            too_long.append((name, n, limits.get(name, 450)))
    assert not too_long, f"modules over their size (name, lines, limit): {too_long}"


def test_trainer_names_no_architecture():
    """The loop reaches a model only through the contract (config, decoder_layers, data_spec,
    flops_per_batch): no attribute path into a model, no import of an architecture package."""
    graph = _graph()
    for mod in ("training", "forward_step", "arguments", "metrics", "layout"):
        name = f"multimodal_dev.{mod}"
        assert not [d for d in graph[name] if d.startswith("multimodal_dev.models.qwen35_vl")], name
        tree = ast.parse((PACKAGES["multimodal_dev"] / f"{mod}.py").read_text())
        attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not attrs & {"language_model", "vision_encoder", "decoder", "variant_config"}, (mod, attrs)
