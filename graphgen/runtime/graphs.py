"""Load an artifact's compiled graphs with their weights bound from the artifact's own checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file

from ..artifact import ArtifactError, Manifest
from ..backends import backend_module
from ..spec import DTYPES


def load_weights(manifest: Manifest, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Per graph: constant name -> tensor, read once from model/*.safetensors and the extra
    constants file, cast to the artifact's dtype, shared between graphs (one copy in memory)."""
    files: dict[str, dict[str, torch.Tensor]] = {"model": {}, "constants": {}}
    for path in sorted(manifest.model_dir.glob("*.safetensors")):
        files["model"].update(load_file(str(path), device=str(device)))
    if manifest.data.get("constants_file"):
        files["constants"] = load_file(str(manifest.path(manifest.data["constants_file"])), device=str(device))
    dtype = DTYPES[manifest.data["dtype"]]
    cast: dict[tuple[str, str], torch.Tensor] = {}
    out = {}
    for phase, graph in manifest.graphs.items():
        bound = {}
        for fqn, (source, key) in graph["weights"].items():
            if key not in files[source]:
                where = manifest.model_dir if source == "model" else manifest.path(manifest.data["constants_file"])
                raise ArtifactError(f"{where}: tensor '{key}' needed by graph '{phase}' is missing; "
                                    "rebuild with `graphgen compile <recipe> --force`")
            if (source, key) not in cast:
                tensor = files[source][key]
                if tensor.is_floating_point() and source == "model":
                    tensor = tensor.to(dtype)
                cast[(source, key)] = tensor.contiguous()
            bound[fqn] = cast[(source, key)]
        out[phase] = bound
    return out


def load_graphs(manifest: Manifest, device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    """phase -> callable taking the graph's inputs positionally (manifest order), returning logits."""
    weights = load_weights(manifest, device)
    graphs = {}
    for phase, graph in manifest.graphs.items():
        backend = backend_module(graph["format"])
        try:
            graphs[phase] = backend.load(Path(manifest.path(graph["file"])), weights[phase])
        except (RuntimeError, OSError) as e:
            raise ArtifactError(f"{manifest.path(graph['file'])}: cannot load graph '{phase}' ({e}); "
                                "rebuild with `graphgen compile <recipe> --force`") from e
    return graphs
