"""Importing the framework-free parts, or asking for --help, imports no framework; a broken
framework makes only its own backend unavailable; the project's modules import each other without
cycles, and common/ never reaches into backends/ or reports/."""
import ast
import json
import subprocess
import sys
import textwrap

from conftest import REPO

FRAMEWORKS = ("torch", "mxnet", "jax", "jaxlib", "flax", "optax", "hypothesis")


def _run(code, *, path_prefix=None):
    env_code = f"import sys; sys.path[:0] = {[str(p) for p in (path_prefix or [])] + [str(REPO)]!r}\n"
    out = subprocess.run([sys.executable, "-c", env_code + textwrap.dedent(code)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_common_and_registry_import_no_framework():
    out = _run(f"""
        import json, sys
        import common, common.spec, common.reference, common.lenet, common.data, common.conventions
        import common.lenet_reference, common.sync, common.convert, common.checkpoint, common.divergence
        import common.testing
        import backends, backends.contract, backends.pool
        backends.names()
        backends.contract.names()
        print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))
    """)
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_compare_help_imports_no_framework():
    out = _run(f"""
        import json, sys, contextlib, io
        sys.argv = ["compare.py", "--help"]
        import compare
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                compare.main(["--help"])
            except SystemExit as e:
                assert e.code == 0
        assert "agreement" in buf.getvalue() and "train" in buf.getvalue()
        print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))
    """)
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_probe_help_imports_no_framework():
    out = _run(f"""
        import json, sys, contextlib, io
        import compare
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                compare.main(["probe", "--help"])
            except SystemExit as e:
                assert e.code == 0
        assert "FRAMEWORK:IMPORT.PATH" in buf.getvalue()
        print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORKS!r})))
    """)
    assert json.loads(out.strip().splitlines()[-1]) == []


def test_broken_framework_is_reported_unavailable_with_reason_and_hint(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise OSError('libtorch_cpu.so: cannot open shared object file')\n")
    out = _run("""
        import backends
        try:
            backends.load("torch")
        except backends.BackendUnavailable as e:
            print("MESSAGE:", e)
        print("STATUS:", backends.available(["torch"])["torch"])
        try:
            backends.load("tensorflow")
        except ValueError as e:
            print("UNKNOWN:", e)
    """, path_prefix=[tmp_path])
    assert "MESSAGE: backend 'torch' is unavailable: OSError: libtorch_cpu.so" in out
    assert "pip install torch==2.13.0" in out
    assert "STATUS: backend 'torch' is unavailable" in out
    assert "UNKNOWN: unknown backend 'tensorflow'; choose from torch, mxnet, jax" in out


# --- the intra-project import graph --------------------------------------------------------------
# Built from the source with `ast` (no module is imported), counting imports anywhere in a file,
# inside functions too: a lazy import that closes a loop is a cycle all the same, only hidden.
# An edge goes to the module an import names (`from backends.torch.bn import x` -> the bn module,
# `from backends import names` -> the backends package); the package __init__s Python runs on the
# way are not edges, since every submodule would otherwise "cycle" through its own package.

PROJECT_PACKAGES = ("common", "backends", "reports")  # reports/: the lead's package, once it exists


def project_modules(root) -> dict:
    """{dotted module name: file} for every .py under the project packages in `root`."""
    modules = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(name, path) -> set:
    """Dotted names of everything module `name` (file `path`) imports, at any depth: for
    `from M import a`, "M.a" (a submodule, or an attribute of M, sorted out by the caller)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.update(f"{module}.{alias.name}" for alias in node.names)
    return out


def import_graph(root) -> dict:
    """{module: set of project modules it imports} for the project in `root`."""
    modules = project_modules(root)

    def target(dotted):  # "pkg.mod.attr" -> the longest prefix that is a project module
        parts = dotted.split(".")
        for k in range(len(parts), 0, -1):
            if ".".join(parts[:k]) in modules:
                return ".".join(parts[:k])
        return None

    return {name: {t for t in map(target, imported_names(name, path)) if t and t != name}
            for name, path in modules.items()}


def find_cycle(graph) -> list | None:
    """One import cycle as [m1, m2, ..., m1], or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def common_violations(root, allowed=()) -> dict:
    """{common module: its imports of backends/reports}; common/ must stay framework-free."""
    bad = {}
    for name, path in project_modules(root).items():
        if name.split(".")[0] == "common" and name not in allowed:
            hits = sorted(n for n in imported_names(name, path)
                          if n.split(".")[0] in ("backends", "reports"))
            if hits:
                bad[name] = hits
    return bad


def test_project_has_no_import_cycles():
    graph = import_graph(REPO)
    assert {"backends.torch.lenet", "backends.mxnet.train", "common.spec"} <= set(graph)
    assert "backends.torch.bn" in graph["backends.torch.lenet"]  # edges really are found
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_common_imports_nothing_from_backends_or_reports():
    assert common_violations(REPO) == {}


def test_the_graph_checks_catch_a_lazy_cycle_and_a_common_to_backends_import(tmp_path):
    """A fake project: the cycle closes through an import inside a function, one module imports
    its sibling relatively, and a common module reaches into backends inside a function."""
    files = {
        "common/__init__.py": "",
        "common/a.py": "from common import b\n",
        "common/b.py": "def f():\n    from .c import g\n    return g\n",
        "common/c.py": "import common.a\n",
        "common/d.py": "def h():\n    from backends.torch import bn\n",
        "backends/__init__.py": "",
        "backends/torch/__init__.py": "from . import bn\n",
        "backends/torch/bn.py": "from backends import UnsupportedSetting\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["common.b"] == {"common.c"} and graph["backends.torch"] == {"backends.torch.bn"}
    assert find_cycle(graph) == ["common.a", "common.b", "common.c", "common.a"]
    assert common_violations(tmp_path) == {"common.d": ["backends.torch.bn"]}
    assert common_violations(tmp_path, ("common.d",)) == {}
    # an attribute of a package is an edge to the package; a package's own __init__ is not a cycle
    assert graph["backends.torch.bn"] == {"backends"}
    assert graph["common.d"] == {"backends.torch.bn"}
    assert find_cycle({k: v for k, v in graph.items() if k not in ("common.a", "common.b")}) is None
