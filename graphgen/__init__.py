"""graphgen: HuggingFace causal LM -> compiled, packaged, paged-decoding deployment on Ascend NPUs.

    import graphgen
    path = graphgen.compile("recipes/tiny-llama.yaml")        # -> artifact directory
    llm = graphgen.LLM(path)
    outs = llm.generate(["Hello"], graphgen.SamplingParams(max_tokens=16))
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from . import ops  # noqa: F401,E402  (registers torch.ops.graphgen.*)

if TYPE_CHECKING:  # pragma: no cover
    from .recipe import Recipe
    from .runtime.engine import LLM
    from .runtime.params import RequestOutput, SamplingParams


def compile(recipe: "Recipe | str | Path | None" = None, **kwargs: Any) -> Path:  # noqa: A001 (the product's verb)
    """Compile a recipe (a Recipe, a YAML path, or None for the embedded default) into an artifact
    and return its directory. kwargs: output=, target=, force=, progress= (see compile_recipe)."""
    from .compiler import compile_recipe
    from .recipe import Recipe, default_recipe, load_recipe

    if recipe is None:
        recipe = default_recipe()
    elif not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return compile_recipe(recipe, **kwargs).path


_LAZY = {"LLM": ".runtime.engine", "SamplingParams": ".runtime.params", "RequestOutput": ".runtime.params"}


def __getattr__(name: str) -> Any:
    # The runtime loads on first use, so `import graphgen` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'graphgen' has no attribute {name!r}")
