"""The native extension is built, loads, and its absence is explained rather than crashed on."""

import subprocess
import sys

import kimad
from kimad._native import build_info


def test_extension_loads_and_reports_its_build():
    import kimad._C  # noqa: F401

    info = build_info()
    assert set(info) == {"cuda", "openmp", "cpu_threads"}
    assert info["openmp"] is True
    assert info["cpu_threads"] >= 1


def test_missing_extension_raises_a_named_error_that_says_how_to_build():
    # A fresh interpreter in which kimad._C cannot be imported, as on an unbuilt checkout.
    code = (
        "import sys; sys.modules['kimad._C'] = None\n"
        "import kimad, kimad.ops, torch\n"
        "try:\n"
        "    kimad.ops.sparse_accumulate(torch.zeros(3), torch.ones(1), torch.zeros(1, dtype=torch.int32))\n"
        "except kimad.ExtensionNotBuiltError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("ERR kimad's native extension kimad._C is not built")
    assert "make setup" in out


def test_package_exposes_version_and_errors():
    assert kimad.__version__
    assert issubclass(kimad.CorruptMessageError, kimad.KimadError)
    assert issubclass(kimad.ExtensionNotBuiltError, ImportError)
