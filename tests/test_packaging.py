"""The repository's layout against the environments it runs in.

The top-level ``kernels/`` folder holds our kernel sources but is installed as ``horizon_triton.kernels``; anything
started from the repository root (``python -m pytest``, a user's script) has the root first on ``sys.path``, where a
regular package named ``kernels`` would shadow Hugging Face's ``kernels`` package that transformers imports."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_root_kernels_folder_never_shadows_an_installed_kernels_package(tmp_path):
    site = tmp_path / "site-packages"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'the installed kernels package'\n")
    script = ("import kernels, horizon_triton.kernels.reference as ref\n"
              "print(kernels.WHO)\n"
              "print(ref.__file__)\n")
    # -c puts the working directory (the repository root) first on sys.path, before PYTHONPATH
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert run.returncode == 0, run.stderr
    who, reference_file = run.stdout.splitlines()
    assert who == "the installed kernels package"
    assert Path(reference_file).resolve() == ROOT / "kernels" / "reference.py"   # our kernels, under our name


def test_horizon_triton_kernels_is_the_root_kernels_folder():
    import horizon_triton.kernels
    from horizon_triton.kernels import reference
    assert Path(reference.__file__).resolve().parent == ROOT / "kernels"
    assert not (ROOT / "kernels" / "__init__.py").exists(), \
        "kernels/__init__.py makes the root folder a regular top-level package that shadows `kernels`"
    assert horizon_triton.kernels.__doc__
