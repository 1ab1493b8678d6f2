import os

import pytest
import torch

# Two cores here and in CI: keep intra-op threads from oversubscribing.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _compile_default(tmp_path_factory, name: str, **changes):
    from graphgen.compiler import compile_recipe
    from graphgen.recipe import Recipe, default_recipe

    data = default_recipe().normalized()
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = data
        for key in path:
            node = node[key]
        node[last] = value
    out = tmp_path_factory.mktemp("artifacts") / name
    return compile_recipe(Recipe.model_validate(data), output=out)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """The embedded default recipe compiled with Inductor (AOTInductor), once per test session."""
    return _compile_default(tmp_path_factory, "tiny-llama").path


@pytest.fixture(scope="session")
def tiny_eager_artifact(tmp_path_factory):
    """The embedded default recipe with the eager backend (exported programs, no compile): fast."""
    return _compile_default(tmp_path_factory, "tiny-llama-eager", compile__backend="eager").path


@pytest.fixture(scope="session")
def tiny_captured(tmp_path_factory):
    """The embedded default recipe's model, saved and loaded as a checkpoint and captured (max_batch 8,
    max_seq_len 256), once per test session: (recipe, model, exported program, checkpoint dir)."""
    from graphgen.capture.export import capture
    from graphgen.capture.load import load_model
    from graphgen.recipe import default_recipe

    recipe = default_recipe()
    model, _, checkpoint = load_model(recipe.model, recipe.dtype, tmp_path_factory.mktemp("ckpt"))
    ep, _ = capture(model, max_batch=8, max_seq_len=256)
    return recipe, model, ep, checkpoint
