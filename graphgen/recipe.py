"""The recipe: what to compile, for which target, with which limits. YAML in, a validated `Recipe` out.

Shapes and types are checked by pydantic; combinations (block size vs KV dtype vs attention ops,
buckets vs limits, backend vs target) by `_conflicts`. Every problem is reported as
`file:line: key.path: what is wrong; what is allowed`, the line taken from the YAML node of the key.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

# The embedded default recipe; recipes/tiny-llama.yaml is a copy of it (tests keep them equal), so
# `graphgen compile` works with no file and no download.
DEFAULT_RECIPE_YAML = """\
# The embedded default: a tiny Llama built from a config with a fixed seed (no download), the
# byte-level tokenizer, compiled for the CPU with Inductor. Small enough to compile in seconds.
name: tiny-llama
model:
  config:
    model_type: llama
    hidden_size: 64
    intermediate_size: 128
    num_hidden_layers: 2
    num_attention_heads: 4
    num_key_value_heads: 2
    head_dim: 16
    vocab_size: 384
    max_position_embeddings: 256
    tie_word_embeddings: false
  seed: 0
  tokenizer: byte
dtype: float32
target: cpu
kv_cache:
  block_size: 16
  layout: BSH
  dtype: auto
head_dim_padding: pad
attention_ops: ifa_pfa
limits:
  max_model_len: 256
  max_num_seqs: 8
  max_num_batched_tokens: 512
graphs:
  decode_batch_sizes: [1, 2, 4, 8]
  prefill: varlen
compile:
  backend: inductor
verify:
  prompts:
    - "Hello, world!"
    - "The quick brown fox"
    - "graphgen: one graph, two worlds."
  max_new_tokens: 16
"""


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, line, key and what is allowed."""


class _Strict(BaseModel):
    # strict: a YAML string "16" is not an int; extra="forbid": typos are errors, not ignored keys.
    model_config = ConfigDict(extra="forbid", strict=True)


class ModelSpec(_Strict):
    """Where the model comes from: exactly one of `path` (local HF checkpoint dir, relative to the
    recipe file), `config` (HF config overrides, random init with `seed`) or `hub` (a repo id
    resolved from the local HF cache only)."""

    path: str | None = None
    config: dict[str, Any] | None = None
    seed: int = 0
    hub: str | None = None
    revision: str | None = None
    # None: the checkpoint's own tokenizer (path/hub) or the byte tokenizer (config).
    tokenizer: str | None = None

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    @property
    def source(self) -> str:
        return "path" if self.path is not None else "hub" if self.hub is not None else "config"

    def resolved_path(self) -> Path | None:
        """`path` made absolute against the recipe file's folder (None unless source is path)."""
        return None if self.path is None else (self._base_dir / self.path).resolve()

    def resolved_tokenizer(self) -> str | Path | None:
        """"byte", a tokenizer folder made absolute against the recipe file's folder, or None."""
        if self.tokenizer is None or self.tokenizer == "byte":
            return self.tokenizer
        return (self._base_dir / self.tokenizer).resolve()


class KVCache(_Strict):
    block_size: int = 16
    layout: Literal["BSH", "BNSD"] = "BSH"
    dtype: Literal["auto", "int8"] = "auto"


class Limits(_Strict):
    max_model_len: int = 512
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048


class PrefillBuckets(_Strict):
    buckets: list[int]


def _prefill_kind(value: Any) -> str | None:
    if isinstance(value, str):
        return "varlen-str"
    if isinstance(value, (dict, PrefillBuckets)):
        return "buckets-map"
    return None


# Tags name the union branch in pydantic's error locations; they are not keys of the YAML.
_UNION_TAGS = {"varlen-str", "buckets-map"}

Prefill = Annotated[
    Union[Annotated[Literal["varlen"], Tag("varlen-str")], Annotated[PrefillBuckets, Tag("buckets-map")]],
    Discriminator(
        _prefill_kind,
        custom_error_type="prefill_kind",
        custom_error_message="must be 'varlen' or a mapping {buckets: [token counts, ...]}",
    ),
]


class Graphs(_Strict):
    # None: powers of two up to limits.max_num_seqs, plus max_num_seqs itself.
    decode_batch_sizes: list[int] | None = None
    prefill: Prefill = "varlen"
    # Where the LM head runs (passes/lm_head.py). runtime: the runtime applies it, so greedy steps take
    # graphgen::greedy_head instead of every logit (cpu; a plain fp32/bf16 head, else it stays in the
    # graph); graph: inside the graphs; auto: runtime for heads of 1M+ weights on cpu, else graph.
    lm_head: Literal["auto", "graph", "runtime"] = "auto"


class TorchairOptions(_Strict):
    mode: Literal["max-autotune", "reduce-overhead", "npugraph_ex"] = "max-autotune"
    frozen_parameter: bool = False
    tiling_schedule_optimize: bool = False
    graph_dump: Literal["txt", "pbtxt", "py"] | None = None
    export_air: bool = False


class Compile(_Strict):
    # None: torchair on npu, inductor elsewhere.
    backend: Literal["inductor", "torchair", "eager"] | None = None
    torchair: TorchairOptions | None = None


class Verify(_Strict):
    prompts: list[str] = Field(default_factory=lambda: ["Hello, world!", "The quick brown fox"])
    max_new_tokens: int = 16


class Recipe(_Strict):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    model: ModelSpec
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    target: Literal["cpu", "cuda", "npu"] = "cpu"
    kv_cache: KVCache = Field(default_factory=KVCache)
    head_dim_padding: Literal["pad", "reject"] = "pad"
    attention_ops: Literal["ifa_pfa", "fia"] = "ifa_pfa"
    limits: Limits = Field(default_factory=Limits)
    graphs: Graphs = Field(default_factory=Graphs)
    compile: Compile = Field(default_factory=Compile)
    verify: Verify = Field(default_factory=Verify)
    # Relative to the current directory; None: artifacts/<name>.
    output: str | None = None

    _source: str = PrivateAttr(default="<object>")

    @model_validator(mode="after")
    def _fill_and_check(self) -> "Recipe":
        if self.graphs.decode_batch_sizes is None:
            self.graphs.decode_batch_sizes = _default_decode_sizes(self.limits.max_num_seqs)
        if self.compile.backend is None:
            self.compile.backend = "torchair" if self.target == "npu" else "inductor"
        if self.compile.backend == "torchair" and self.compile.torchair is None:
            self.compile.torchair = TorchairOptions()
        if self.output is None:
            self.output = f"artifacts/{self.name}"
        problems = _conflicts(self)
        if problems:
            raise PydanticCustomError("recipe_conflict", "{summary}", {"summary": _summary(problems), "problems": problems})
        return self

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_yaml_text(cls, text: str, source: str = "<string>", base_dir: str | Path | None = None) -> "Recipe":
        """Parse and validate a recipe. `source` names it in errors; relative model/tokenizer paths
        resolve against `base_dir` (default: the current directory)."""
        lines = _key_lines(text, source)
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise RecipeError(f"{source}:1: a recipe is a YAML mapping (name:, model:, ...); got {type(data).__name__}")
        try:
            recipe = cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(_format_errors(exc, source, lines)) from None
        recipe._source = source
        recipe.model._base_dir = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
        return recipe

    # --- views ---------------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """The file (or "<string>") this recipe was read from."""
        return self._source

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    def normalized(self) -> dict[str, Any]:
        """JSON-able, every default filled: what the manifest records and the cache key hashes."""
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """sha256 of the normalized recipe (sorted keys): equal for recipes that mean the same."""
        text = json.dumps(self.normalized(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file; relative model paths are relative to the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    return Recipe.from_yaml_text(text, source=str(path), base_dir=path.parent)


def default_recipe() -> Recipe:
    """The embedded tiny-llama recipe (recipes/tiny-llama.yaml is a copy)."""
    return Recipe.from_yaml_text(DEFAULT_RECIPE_YAML, source="<builtin tiny-llama>")


# --- cross-field checks -----------------------------------------------------------------------
Problem = tuple[tuple[str | int, ...], str]


def _default_decode_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1 << i for i in range(max(max_num_seqs, 1).bit_length()) if (1 << i) <= max_num_seqs]
    return sizes if sizes and sizes[-1] == max_num_seqs else sizes + [max_num_seqs]


def _multiples(step: int) -> str:
    return f"{step}, {2 * step}, {3 * step}, ..."


def _check_buckets(path: tuple, sizes: list[int], limit: int, limit_name: str, what: str) -> list[Problem]:
    if not sizes:
        return [(path, f"needs at least one {what}")]
    if any(s < 1 for s in sizes):
        return [(path, f"{sizes}: every {what} must be >= 1")]
    if len(set(sizes)) != len(sizes):
        return [(path, f"{sizes} has duplicates; list each {what} once")]
    if sizes != sorted(sizes):
        return [(path, f"{sizes} is not sorted; use {sorted(sizes)}")]
    if sizes[-1] > limit:
        return [(path, f"largest {what} {sizes[-1]} exceeds {limit_name} ({limit}); raise the limit or drop it")]
    return []


def _conflicts(r: Recipe) -> list[Problem]:
    """Combinations the types cannot express, each as (key path, message)."""
    out: list[Problem] = []
    m = r.model
    given = [k for k in ("path", "config", "hub") if getattr(m, k) is not None]
    if len(given) != 1:
        where = ("model", given[1]) if len(given) > 1 else ("model",)
        out.append((where, f"give exactly one of path | config | hub (got {', '.join(given) or 'none'})"))
    if m.config is not None and not isinstance(m.config.get("model_type"), str):
        out.append((("model", "config"), "needs model_type (e.g. llama, qwen2, mistral) to pick the HF config class"))
    head_dim = _config_head_dim(m.config)
    if r.head_dim_padding == "reject" and head_dim is not None and head_dim % 16:
        out.append((("head_dim_padding",), f"reject, but model.config gives head_dim {head_dim}, not a multiple of 16; "
                                           "use head_dim_padding: pad (exact: zero columns) or a head_dim like "
                                           f"{-(-head_dim // 16) * 16}"))
    if "seed" in m.model_fields_set and m.config is None:
        out.append((("model", "seed"), "seed only applies to model.config (random init); remove it"))
    if m.revision is not None and m.hub is None:
        out.append((("model", "revision"), "revision only applies to model.hub; remove it"))

    lim = r.limits
    for key in ("max_model_len", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(lim, key) < 1:
            out.append((("limits", key), f"{getattr(lim, key)} must be >= 1"))
    if lim.max_num_batched_tokens >= 1 and lim.max_num_batched_tokens < lim.max_num_seqs:
        out.append((("limits", "max_num_batched_tokens"),
                    f"{lim.max_num_batched_tokens} is below max_num_seqs ({lim.max_num_seqs}): a full decode step "
                    "would not fit; use at least max_num_seqs"))

    kv = r.kv_cache
    step = 16
    why = ""
    if kv.dtype == "int8":
        step, why = 32, " for an int8 KV cache"
    if r.attention_ops == "fia" and r.target == "npu":
        step, why = 128, " with attention_ops fia on npu (FIA paged prefill needs it)"
    if kv.block_size < 1 or kv.block_size % step:
        out.append((("kv_cache", "block_size"), f"{kv.block_size} is not a multiple of {step}{why}; use {_multiples(step)}"))

    out += _check_buckets(("graphs", "decode_batch_sizes"), r.graphs.decode_batch_sizes, lim.max_num_seqs,
                          "limits.max_num_seqs", "decode batch size")
    if isinstance(r.graphs.prefill, PrefillBuckets):
        out += _check_buckets(("graphs", "prefill", "buckets"), r.graphs.prefill.buckets, lim.max_num_batched_tokens,
                              "limits.max_num_batched_tokens", "prefill bucket")

    if r.graphs.lm_head == "runtime" and r.target != "cpu":
        out.append((("graphs", "lm_head"), f"runtime is for target cpu (target is {r.target}); use auto or graph"))
    if r.target == "npu" and r.dtype == "float32":
        out.append((("dtype",), "float32 on npu: the NPU attention ops take float16 or bfloat16; use one of them"))
    allowed = {"cpu": ("inductor", "eager"), "cuda": ("inductor", "eager"), "npu": ("torchair", "eager")}[r.target]
    if r.compile.backend not in allowed:
        out.append((("compile", "backend"),
                    f"{r.compile.backend} does not build for target {r.target}; use {' or '.join(allowed)}"))
    if r.compile.torchair is not None and r.compile.backend != "torchair":
        out.append((("compile", "torchair"), f"torchair options need backend torchair (backend is {r.compile.backend})"))

    if not r.verify.prompts:
        out.append((("verify", "prompts"), "needs at least one prompt"))
    if r.verify.max_new_tokens < 1:
        out.append((("verify", "max_new_tokens"), f"{r.verify.max_new_tokens} must be >= 1"))
    return out


def _config_head_dim(config: dict[str, Any] | None) -> int | None:
    """head_dim as HF derives it, when the config overrides say enough (else the model decides at load)."""
    if not config:
        return None
    if isinstance(config.get("head_dim"), int):
        return config["head_dim"]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        return hidden // heads
    return None


def _summary(problems: list[Problem]) -> str:
    return "; ".join(f"{_dotted(p)}: {msg}" for p, msg in problems)


# --- errors with file:line ---------------------------------------------------------------------
def _dotted(path: tuple) -> str:
    s = ""
    for part in path:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s or "<recipe>"


def _key_lines(text: str, source: str) -> dict[tuple, int]:
    """Key path -> 1-based line, from the composed YAML nodes (the value's line for scalars, the
    key's line for mappings and lists). Duplicate keys are errors: YAML would keep the last silently."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise RecipeError(f"{source}:{line}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    lines: dict[tuple, int] = {(): 1}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set = set()
            for key_node, value_node in node.value:
                key = key_node.value
                if key in seen:
                    raise RecipeError(f"{source}:{key_node.start_mark.line + 1}: {_dotted(path + (key,))}: "
                                      "duplicate key; keep one")
                seen.add(key)
                at = value_node if isinstance(value_node, yaml.ScalarNode) else key_node
                lines[path + (key,)] = at.start_mark.line + 1
                walk(value_node, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


def _line_of(path: tuple, lines: dict[tuple, int]) -> int:
    while path and path not in lines:
        path = path[:-1]  # a missing key: point at its parent
    return lines.get(path, 1)


def _allowed_keys(path: tuple) -> list[str]:
    model: Any = Recipe
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format_errors(exc: ValidationError, source: str, lines: dict[tuple, int]) -> str:
    out = []
    for err in exc.errors():
        if err["type"] == "recipe_conflict":
            for path, msg in err["ctx"]["problems"]:
                out.append(f"{source}:{_line_of(tuple(path), lines)}: {_dotted(path)}: {msg}")
            continue
        path = tuple(p for p in err["loc"] if p not in _UNION_TAGS)
        line = _line_of(path, lines)
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(path[:-1])
            msg = f"unknown key; allowed here: {', '.join(allowed)}" if allowed else "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = f"{err['input']!r} is not accepted: {err['msg'].replace('Input should be', 'should be')}"
        out.append(f"{source}:{line}: {_dotted(path)}: {msg}")
    return "\n".join(out)
