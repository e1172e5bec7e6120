"""Horovod (built by scripts/bootstrap.sh) works with Gloo under horovodrun. Fails, never skips, without it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent / "scripts"


def horovodrun() -> str:
    exe = Path(sys.executable).parent / "horovodrun"
    if not exe.exists():
        pytest.fail(f"horovodrun not found next to {sys.executable}; run `make setup` to build Horovod 0.28.1")
    return str(exe)


def test_horovod_torch_imports_with_gloo_built():
    import horovod
    import horovod.torch as hvd

    assert horovod.__version__ == "0.28.1"
    assert hvd.gloo_built(), "Horovod was built without Gloo; rebuild it with scripts/bootstrap.sh"


@pytest.mark.horovod
@pytest.mark.timeout(300)
def test_allreduce_and_uneven_allgather_on_two_ranks():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [horovodrun(), "-np", "2", "-H", "localhost:2", "--gloo", "--start-timeout", "120",
         sys.executable, str(SCRIPTS / "horovod_smoke.py")],
        capture_output=True, text=True, timeout=240, env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for rank in range(2):
        assert f"horovod smoke: rank {rank}/2 OK" in output, output
