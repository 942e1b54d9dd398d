"""Importing the framework-free parts, or asking for --help, imports no framework; a broken
framework makes only its own backend unavailable."""
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
        import common.testing
        import backends
        backends.names()
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
