"""The house rules, checked on the source: one `steptrace` namespace, layers, tui's packages by role.

Every import statement of every module is read with :mod:`ast` (lazy imports inside functions
included), so a rule holds whether or not the code path runs in a test.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("tracefmt", "recorders", "differ", "tui", "assets")
#: Frameworks and the one module allowed to import each (STYLE.md: one module per framework);
#: numba has one kernel module per layer that compiles (tracefmt sits below differ).
FRAMEWORKS: dict[str, str | tuple[str, ...]] = {
    "torch": "recorders/torch.py",
    "onnxruntime": "recorders/onnxruntime.py",
    "onnx": "recorders/onnxruntime.py",
    "coremltools": "recorders/coreml.py",
    "transformers": "recorders/hf.py",
    "numba": ("differ/kernel.py", "tracefmt/statskernel.py"),  # the compiled kernels (the `fast` extra)
    "llvmlite": ("differ/kernel.py", "tracefmt/statskernel.py"),
}
#: The compiled kernels and the one policy module that imports each, inside a function.
KERNELS = {"steptrace.differ.kernel": "differ/kernelpolicy.py", "steptrace.tracefmt.statskernel": "tracefmt/statspolicy.py"}
#: What each layer may import of the others (``tui → differ → tracefmt``, ``tui → recorders →
#: tracefmt``; triage, in recorders, judges re-runs with the differ; nothing imports tui).
LAYER_MAY_IMPORT = {
    "tracefmt": set(),
    "differ": {"tracefmt"},
    "recorders": {"tracefmt", "differ"},
    "tui": {"tracefmt", "differ", "recorders", "assets"},
    "assets": set(),
}
#: tui's packages by role, and which of them each may import. ``cli`` dispatches to the
#: commands; a command runs one verb (the view command starts the app); the app draws what the
#: viewer's data model answers; the viewer and the commands use the shared rendering.
TUI_MAY_IMPORT = {
    "cli": {"cli", "commands", "render"},
    "commands": {"commands", "render", "viewer", "app"},
    "app": {"app", "viewer", "render"},
    "viewer": {"viewer", "render"},
    "render": {"render"},
}


def _sources(*, everywhere: bool = False) -> list[Path]:
    top = ROOT.glob("**/*.py") if everywhere else (p for layer in LAYERS for p in (ROOT / layer).glob("**/*.py"))
    return sorted(p for p in top if ".git" not in p.parts and "build" not in p.parts and not p.is_symlink())


def _package(path: Path) -> list[str]:
    """The package a module belongs to, as folder names (an __init__.py belongs to its own folder)."""
    return list(path.relative_to(ROOT).parts[:-1])


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, absolute: (line, dotted name), relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out: list[tuple[int, str]] = []
    pkg = ["steptrace", *_package(path)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            # `from steptrace.tui import commands` imports the package steptrace.tui.commands
            out += [(node.lineno, f"{mod}.{a.name}") for a in node.names] if mod in ("steptrace", "steptrace.tui") \
                else [(node.lineno, mod)]
    return out


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_no_source_imports_a_bare_layer_name():
    """`import tracefmt` would load a second copy of the layer beside steptrace.tracefmt."""
    bad = [f"{_where(p, ln)} imports {mod}" for p in _sources(everywhere=True) for ln, mod in _imports(p)
           if mod.split(".")[0] in LAYERS]
    assert not bad, "import through the namespace (from steptrace.tracefmt import ...):\n" + "\n".join(bad)


def test_layers_import_only_the_layers_below_them():
    bad = []
    for p in _sources():
        layer = p.relative_to(ROOT).parts[0]
        for ln, mod in _imports(p):
            parts = mod.split(".")
            if parts[0] == "steptrace" and len(parts) > 1 and parts[1] in LAYERS and parts[1] != layer \
                    and parts[1] not in LAYER_MAY_IMPORT[layer]:
                bad.append(f"{_where(p, ln)}: {layer} imports {mod}")
    assert not bad, "\n".join(bad)


def test_each_framework_is_imported_in_one_module():
    bad = []
    for p in _sources():
        rel = p.relative_to(ROOT).as_posix()
        for ln, mod in _imports(p):
            owner = FRAMEWORKS.get(mod.split(".")[0])
            if owner is not None and rel not in ((owner,) if isinstance(owner, str) else owner):
                bad.append(f"{_where(p, ln)} imports {mod} (only {owner} may)")
    assert not bad, "\n".join(bad)


def test_the_compiled_kernel_is_imported_lazily_by_its_policy_alone():
    """numba costs a process ~0.3-0.8 s: differ/kernel.py and tracefmt/statskernel.py (its only
    importers) are imported only by their policies (differ/kernelpolicy.py,
    tracefmt/statspolicy.py), inside a function, so importing a layer never loads numba."""
    bad = []
    for p in _sources(everywhere=True):
        rel = p.relative_to(ROOT).as_posix()
        if rel.startswith(("tests/", "bench/")):
            continue
        top = {n.lineno for n in ast.parse(p.read_text(encoding="utf-8")).body if isinstance(n, (ast.Import, ast.ImportFrom))}
        for ln, mod in _imports(p):
            if mod in KERNELS and (rel != KERNELS[mod] or ln in top):
                bad.append(f"{_where(p, ln)} imports {mod}" + (" at module level" if ln in top else ""))
    assert not bad, "\n".join(bad)


def test_textual_is_imported_only_under_tui_app():
    bad = [f"{_where(p, ln)} imports {mod}" for p in _sources() for ln, mod in _imports(p)
           if mod.split(".")[0] == "textual" and p.relative_to(ROOT).parts[:2] != ("tui", "app")]
    assert not bad, "textual belongs to tui/app (the viewer's Textual app):\n" + "\n".join(bad)


def _tui_role(path: Path) -> str | None:
    parts = path.relative_to(ROOT).parts
    if parts[0] != "tui":
        return None
    if len(parts) == 2:
        return {"cli.py": "cli", "__init__.py": None}.get(parts[1], "?" + parts[1])
    return parts[1]


def test_tui_packages_by_role_import_only_what_their_role_allows():
    bad = []
    for p in _sources():
        role = _tui_role(p)
        if role is None:
            continue
        assert role in TUI_MAY_IMPORT, f"{p.relative_to(ROOT)}: a tui module outside the role packages {sorted(TUI_MAY_IMPORT)}"
        for ln, mod in _imports(p):
            parts = mod.split(".")
            if parts[:2] == ["steptrace", "tui"] and len(parts) > 2:
                target = parts[2]
                if target not in TUI_MAY_IMPORT[role]:
                    bad.append(f"{_where(p, ln)}: tui/{role} imports {mod}")
    assert not bad, "\n".join(bad)


def test_the_wheel_installs_only_steptrace_and_every_package_is_listed():
    """No generic name (tui, differ, ...) at the top of site-packages; no sub-package left out of the wheel."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert config["package-dir"] == {"steptrace": "."}
    listed = set(config["packages"])
    assert all(name == "steptrace" or name.startswith("steptrace.") for name in listed), sorted(listed)
    on_disk = {"steptrace"} | {
        "steptrace." + ".".join(init.parent.relative_to(ROOT).parts)
        for layer in LAYERS for init in (ROOT / layer).glob("**/__init__.py")
    }
    assert listed == on_disk, f"pyproject packages {sorted(listed ^ on_disk)} differ from the folders with __init__.py"


def test_import_steptrace_is_cheap_and_carries_the_version():
    import subprocess
    import sys

    code = ("import sys, steptrace; print(steptrace.__version__); "
            "print(sorted(m for m in sys.modules if m.startswith('steptrace.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout
    version, loaded = out.splitlines()
    from steptrace import tracefmt

    assert version == tracefmt.__version__
    assert loaded == "[]", "import steptrace must import no layer"


@pytest.mark.parametrize("layer", ["tracefmt", "differ", "recorders", "tui"])
def test_modules_stay_small(layer):
    """STYLE.md: split a module past ~400 lines (tolerance: 420)."""
    big = {p.relative_to(ROOT).as_posix(): n for p in (ROOT / layer).glob("**/*.py")
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > 420}
    assert not big, big
