"""`graphgen compile|run|verify|inspect|doctor|bench`: the command line (typer + rich)."""
from __future__ import annotations

import atexit
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)
out = Console()


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _load_recipe(recipe: Optional[Path]):
    from .recipe import RecipeError, default_recipe, load_recipe

    try:
        return default_recipe() if recipe is None else load_recipe(recipe)
    except RecipeError as e:
        _fail(str(e), 2)


@app.command("compile")
def compile_cmd(
    recipe: Optional[Path] = typer.Argument(None, help="recipe YAML (default: the embedded tiny-llama)"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="artifact directory (default: the recipe's output)"),
    target: Optional[str] = typer.Option(None, help="override the recipe's target: cpu | cuda | npu"),
    force: bool = typer.Option(False, "--force", help="rebuild even when the artifact is up to date"),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="verify the artifact against HF eager afterwards"),
) -> None:
    """Compile a recipe into an artifact: capture, paged-attention rewrite, lint, backend, package."""
    from .compiler import CompileError, compile_recipe

    r = _load_recipe(recipe)
    start = time.perf_counter()
    with console.status("compiling", spinner="dots") as status:
        def progress(stage: str, detail: str) -> None:
            console.print(f"[dim]{time.perf_counter() - start:6.1f}s[/] [bold cyan]{stage:>10}[/] {detail}", highlight=False)
            status.update(f"{stage}: {detail}")

        try:
            result = compile_recipe(r, output=output, target=target, force=force, progress=progress)
        except (CompileError, NotImplementedError) as e:
            _fail(str(e))
    if result.up_to_date:
        console.print(f"[green]up to date[/] {result.path} (use --force to rebuild)")
    else:
        _print_compile_summary(result)
    if verify and not result.up_to_date:
        _run_verify(result.path, prompts=None, max_new_tokens=None, as_json=False, layers=False)


def _print_compile_summary(result) -> None:
    table = Table(title=f"compiled {result.path}", show_header=True)
    table.add_column("graph")
    table.add_column("file")
    table.add_column("attention nodes rewritten", justify="right")
    table.add_column("size", justify="right")
    for phase, rel in result.graphs.items():
        table.add_row(phase, rel, str(result.attention_rewritten.get(phase, 0)), _size(result.sizes.get(rel, 0)))
    console.print(table)
    lint = result.lint
    verdict = "[green]NPU-expressible[/]" if lint.get("npu_expressible") else "[yellow]not NPU-portable[/]"
    console.print(f"lint: {verdict}, {lint.get('errors', 0)} error(s)")
    for line in lint.get("findings", []):
        console.print(f"  {line}", highlight=False, markup=False)
    console.print(f"total {_size(sum(result.sizes.values()))} in {result.seconds:.1f}s")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def inspect(artifact: Path = typer.Argument(..., help="artifact directory"),
            as_json: bool = typer.Option(False, "--json", help="print the manifest summary and lint report as JSON")) -> None:
    """Show an artifact: model, KV spec, graphs and their inputs, lint findings."""
    from .artifact import ArtifactError, read_manifest

    try:
        m = read_manifest(artifact, verify=False)
    except ArtifactError as e:
        _fail(str(e))
    lint_path = m.path("report/lint.json")
    lint = json.loads(lint_path.read_text()) if lint_path.is_file() else None
    summary = {
        "name": m.data["name"], "target": m.data["target"], "dtype": m.data["dtype"],
        "model_type": m.data["model_config"].get("model_type"), "kv": m.data["kv"], "limits": m.limits,
        "graphs": {p: {k: g[k] for k in ("file", "format", "inputs") if k in g} | {
            k: g[k] for k in ("batch_sizes", "token_buckets") if k in g} for p, g in m.graphs.items()},
        "npu_portable": m.data.get("npu_portable"), "versions": m.data.get("versions"), "lint": lint,
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    out.print(f"[bold]{summary['name']}[/] ({summary['model_type']}, {summary['dtype']}, target {summary['target']})")
    out.print(f"KV cache: {m.data['kv']}")
    table = Table("graph", "format", "inputs", "buckets")
    for phase, g in summary["graphs"].items():
        buckets = g.get("batch_sizes") or g.get("token_buckets") or "dynamic"
        table.add_row(phase, g["format"], ", ".join(g["inputs"]), str(buckets))
    out.print(table)
    if lint is not None:
        verdict = "NPU-expressible" if lint["npu_expressible"] else "NOT NPU-expressible"
        out.print(f"lint ({lint['checked_nodes']} attention nodes checked): {verdict}")
        for f in lint["findings"]:
            where = f"layer {f['layer']}" if f["layer"] is not None else "graph"
            out.print(f"  [{f['severity']}] {f['rule']} ({where}, {f['node']}): {f['value']} -> {f['fix']}",
                      highlight=False, markup=False)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        _fail(f"--prompt-ids {text!r}: give comma-separated token ids, e.g. --prompt-ids 1,2,3")


@app.command()
def run(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    prompt: list[str] = typer.Option([], "--prompt", "-p", help="a text prompt (repeatable)"),
    prompt_ids: list[str] = typer.Option([], "--prompt-ids", help="a prompt as token ids, e.g. 1,2,3 (repeatable)"),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.0),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="keep generating past EOS"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object with outputs and stats"),
) -> None:
    """Generate from an artifact with paged decoding; streams text, or prints JSON with --json."""
    from .artifact import ArtifactError
    from .runtime.engine import LLM
    from .runtime.params import SamplingParams

    prompts: list = list(prompt) + [_parse_ids(p) for p in prompt_ids]
    if not prompts:
        _fail("give at least one --prompt TEXT or --prompt-ids 1,2,3")
    try:
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, ignore_eos=ignore_eos)
        llm = LLM(artifact)
    except (ArtifactError, ValueError) as e:
        _fail(str(e))
    start = time.perf_counter()
    results: dict[int, object] = {}
    for event in llm.stream(prompts, params):
        if event.output is not None:
            results[event.index] = event.output
            if not as_json and event.output.error:
                console.print(f"[red]request {event.index} failed:[/] {event.output.error}")
        elif not as_json and len(prompts) == 1:
            out.print(event.text_delta, end="", highlight=False, markup=False)
    elapsed = time.perf_counter() - start
    outputs = [results[i] for i in sorted(results)]
    stats = llm.stats.to_dict() | {"load_seconds": round(llm.load_seconds, 3), "total_seconds": round(elapsed, 3)}
    if as_json:
        payload = {"outputs": [{"prompt_token_ids": o.prompt_token_ids, "token_ids": o.token_ids, "text": o.text,
                                "finish_reason": o.finish_reason, **({"error": o.error} if o.error else {})}
                               for o in outputs], "stats": stats}
        sys.stdout.write(json.dumps(payload) + "\n")
        return
    if len(prompts) == 1:
        out.print()
    else:
        for i, o in enumerate(outputs):
            label = prompts[i] if isinstance(prompts[i], str) else f"ids {prompts[i]}"
            out.print(f"[bold]{label!r}[/] -> {o.text!r} [dim]({o.finish_reason}, {len(o.token_ids)} tokens)[/]")
    console.print(f"[dim]prefill {stats['prefill_tokens_per_s']} tok/s, decode {stats['decode_tokens_per_s']} tok/s, "
                  f"load {stats['load_seconds']}s[/]")


def _run_verify(artifact: Path, *, prompts, max_new_tokens, as_json: bool, layers: bool) -> None:
    from .artifact import ArtifactError
    from .verify import VerifyError, print_report, verify_artifact

    try:
        report = verify_artifact(artifact, prompts=prompts, max_new_tokens=max_new_tokens, layers=layers)
    except (VerifyError, ArtifactError) as e:
        _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
    else:
        print_report(report, console)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
def verify(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="a file with one prompt per line"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n"),
    as_json: bool = typer.Option(False, "--json"),
    layers: bool = typer.Option(False, "--layers", help="also find the first layer whose hidden state diverges"),
) -> None:
    """Compare the artifact with HF eager on the same checkpoint, in tiers; non-zero exit on failure."""
    texts = None
    if prompts is not None:
        if not prompts.is_file():
            _fail(f"--prompts {prompts}: no such file")
        texts = [line for line in prompts.read_text().splitlines() if line.strip()]
    _run_verify(artifact, prompts=texts, max_new_tokens=max_new_tokens, as_json=as_json, layers=layers)


@app.command()
def doctor(
    recipe: Optional[Path] = typer.Argument(None, help="recipe whose target to check"),
    build: bool = typer.Option(False, "--build", help="build now what a first CPU compile here would build inside "
                               "it: graphgen's CPU kernels and torch's precompiled headers (once per machine)"),
) -> None:
    """What this machine has (torch, transformers, torch_npu, torchair, CANN, devices) and can build."""
    from .doctor import build_caches, doctor as run_doctor, print_builds, print_doctor

    report, code = run_doctor(str(recipe) if recipe else None)
    print_doctor(report, out)
    if build:
        with console.status("building graphgen's CPU kernels and torch's precompiled headers (tens of seconds "
                            "where they are not built yet)"):
            rows, build_code = build_caches()
        print_builds(rows, out)
        code = code or build_code
    raise typer.Exit(code)


@app.command()
def demo(
    output: Path = typer.Option(Path("artifacts/tiny-llama"), "--output", "-o"),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", "-n"),
) -> None:
    """The main job on the embedded default: compile tiny-llama (verify included) and run it."""
    compile_cmd(recipe=None, output=output, target=None, force=False, verify=True)
    from .runtime.engine import LLM
    from .runtime.params import SamplingParams

    llm = LLM(output)
    r = _load_recipe(None)
    outs = llm.generate(list(r.verify.prompts), SamplingParams(max_tokens=max_new_tokens))
    for prompt, o in zip(r.verify.prompts, outs):
        out.print(f"[bold]{prompt!r}[/] -> {o.text!r} [dim]({o.finish_reason}, {len(o.token_ids)} tokens: {o.token_ids})[/]",
                  highlight=False)
    stats = llm.stats.to_dict()
    console.print(f"[dim]prefill {stats['prefill_tokens_per_s']} tok/s, decode {stats['decode_tokens_per_s']} tok/s[/]")


@app.command()
def bench(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    batch_sizes: str = typer.Option("1,16", "--batch-sizes", help="decode batch sizes, comma-separated"),
    workload: str = typer.Option("all", "--workload", help="fixed | mixed | all"),
    vs_hf: bool = typer.Option(False, "--vs-hf", help="also run HF generate (eager, sdpa) on the artifact's checkpoint"),
    prompt_len: int = typer.Option(128, "--prompt-len", help="fixed workload prompt length"),
    output_len: int = typer.Option(128, "--output-len", help="fixed workload output length"),
    repeats: int = typer.Option(3, "--repeats", help="timed runs per measurement (median reported)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    step_tokens: Optional[int] = typer.Option(
        None, "--step-tokens", help="tokens per step while sequences decode (runtime default; 0: separate "
        "prefill and decode steps)"),
) -> None:
    """Decode tokens/s, a mixed serving workload, TTFT, load time, peak RSS, the roofline; --vs-hf for ratios."""
    from .bench import run_bench_cli

    run_bench_cli(artifact, batch_sizes=batch_sizes, workload=workload, vs_hf=vs_hf, prompt_len=prompt_len,
                  output_len=output_len, repeats=repeats, threads=threads, as_json=as_json, fail=_fail,
                  console=console, out=out, step_tokens=step_tokens)


def main() -> None:
    """The `graphgen` command: run it, then leave without the interpreter's teardown. With torch
    and a compile's state loaded, finalizing every module and object takes 1-2 s of CPU after the
    work is done; the exit handlers still run and the output is flushed first."""
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":  # pragma: no cover
    main()
