"""The checkout never shadows an installed distribution, and the light commands stay light.

Python run from the repo root puts the root first on `sys.path` (`python -m distill`, `python -m pytest`,
`python -c`), so a top-level folder with an `__init__.py` would hide a PyPI package of the same name. transformers
>= 5.25 requires PyPI's `kernels` and imports it from `transformers.modeling_utils`; our `kernels/` has no
`__init__.py` and so can only ever be a namespace portion, which loses to any regular package.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run_from_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_only_distill_is_a_regular_package_at_the_top():
    """Any other top-level `X/__init__.py` or `X.py` would win over an installed `X` when run from the root."""
    importable = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {p.stem for p in ROOT.glob("*.py")}
    assert importable == {"distill"}, f"top-level importable names besides distill: {importable - {'distill'}}"


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="PyPI's kernels is not installed")
def test_transformers_imports_from_the_repo_root():
    code = ("import kernels, transformers.modeling_utils, json, pathlib; "
            "print(json.dumps([str(pathlib.Path(p).resolve()) for p in [kernels.__file__]]))")
    done = run_from_root("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    (kernels_file,) = json.loads(done.stdout)
    assert not Path(kernels_file).is_relative_to(ROOT.resolve()), "`import kernels` resolved into the checkout"


def test_cli_help_and_collection_work_from_the_repo_root():
    done = run_from_root("-m", "distill", "--help")
    assert done.returncode == 0 and "validate" in done.stdout, done.stderr[-2000:]
    done = run_from_root("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider")
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]


@pytest.mark.parametrize("recipe", [None, "recipes/smollm2-135m/hybrid50-mamba2.yaml"])
def test_validate_imports_no_torch(tmp_path, recipe):
    """`distill validate` checks a recipe without torch or transformers (their import alone takes seconds): how its
    wall time stays under a second, checked without timing it."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    if recipe is None:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(f"teacher: {{source: {teacher}}}\nstages: [{{name: end_to_end, max_tokens: 1e4}}]\n")
    code = ("import sys; from distill.cli import main; assert main(['validate', sys.argv[1]]) == 0; "
            "heavy = sorted({'torch', 'transformers', 'accelerate', 'datasets'} & set(sys.modules)); "
            "assert not heavy, heavy")
    done = run_from_root("-c", code, str(recipe))
    assert done.returncode == 0, done.stderr[-2000:]


REGISTRATION_ORDERS = {
    "distill first": "import distill\nfrom transformers import AutoModelForCausalLM",
    "transformers' Auto classes first": "from transformers import AutoModelForCausalLM\nimport distill",
    "a stock model class after distill": "import distill\nfrom transformers import LlamaForCausalLM, AutoModelForCausalLM",
}


@pytest.mark.parametrize("order", list(REGISTRATION_ORDERS))
def test_import_distill_registers_the_auto_classes(tmp_path, order):
    """A fresh interpreter: `import distill` (before or after transformers) and `AutoModelForCausalLM.from_pretrained`
    give the installed HybridForCausalLM, not the checkpoint's remote-code copy, without `trust_remote_code`."""
    from distill.configuration_hybrid import HybridConfig
    from distill.modeling_hybrid import HybridForCausalLM

    config = HybridConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    HybridForCausalLM(config).save_pretrained(tmp_path / "model")
    code = (f"{REGISTRATION_ORDERS[order]}\n"
            "import sys\n"
            "assert 'distill.modeling_hybrid' not in sys.modules  # registration imports the model only when used\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r})\n"
            "print(type(model).__module__, type(model).__name__)")
    done = run_from_root("-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["distill.modeling_hybrid", "HybridForCausalLM"]
