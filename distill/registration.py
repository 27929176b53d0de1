"""Registration with transformers' Auto classes that costs nothing until transformers loads them.

`import distill` must stay light (no torch, no transformers: `distill validate` answers in well under a
second), yet after it `AutoModelForCausalLM.from_pretrained(checkpoint)` must load the installed
`HybridForCausalLM` without `trust_remote_code`, as packages of this ecosystem do on import. Two steps, each
at the first moment it can run without importing anything the caller has not already imported:

1. `HybridConfig` joins `AutoConfig` right after transformers executes its `configuration_auto` module (a
   post-import hook on the import system), or at once if that module is already loaded. Every Auto class loads
   it before it resolves a model type, and it has already imported `PreTrainedConfig`, all
   `configuration_hybrid` needs.
2. `HybridForCausalLM` joins `AutoModelForCausalLM` when the first `HybridConfig` is built (see
   `HybridConfig.__post_init__`): the Auto classes build the config before they look up its model class, and
   by then no transformers module is half-imported, so importing `modeling_hybrid` (torch, the kernels) is
   safe.
"""

import importlib
import importlib.abc
import importlib.util
import sys

CONFIGURATION_AUTO = "transformers.models.auto.configuration_auto"


def register_config(configuration_auto) -> None:
    from distill.configuration_hybrid import HybridConfig

    configuration_auto.AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)


def register_model() -> None:
    """Import `distill.modeling_hybrid`, which registers the model as it loads (unless loaded or loading)."""
    if "distill.modeling_hybrid" not in sys.modules:
        importlib.import_module("distill.modeling_hybrid")


class ConfigurationAutoHook(importlib.abc.MetaPathFinder):
    """Finds `configuration_auto` with the other finders; runs `register_config` after its module executes."""

    def find_spec(self, name, path=None, target=None):
        if name != CONFIGURATION_AUTO:
            return None
        sys.meta_path.remove(self)  # one module, once: the other finders locate it, and no later import pays
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            register_config(module)

        spec.loader.exec_module = exec_module  # this module's own loader object, not a shared class
        return spec


def install() -> None:
    """Register now if transformers' Auto classes are loaded, else when they load."""
    if CONFIGURATION_AUTO in sys.modules:
        register_config(sys.modules[CONFIGURATION_AUTO])
    elif not any(isinstance(finder, ConfigurationAutoHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, ConfigurationAutoHook())
