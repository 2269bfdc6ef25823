"""The OpenAI-compatible HTTP server behind `sedac-chat serve`: FastAPI routes over one SedacEngine. Requests wait in
a bounded queue and run one at a time on a single inference thread; every response carries SEDAC's telemetry.
FastAPI, uvicorn and prometheus_client are the `server` extra, so only this module imports them."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import math
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import GenerationRequest, SedacEngine
from .errors import ConfigError, PromptTooLongError, SedacError
from .events import Event, GenerationEnd, GenerationStart, TokenEvent

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 32
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # what OpenAI's legacy completions endpoint defaults to
MAX_STOP_STRINGS = 4  # as OpenAI
DISCONNECT_POLL_S = 0.2  # how often a waiting handler asks whether its client is still there
API_KEY_ENV = "SEDAC_API_KEY"

EngineFactory = Callable[[], SedacEngine]

# engine stop reason -> OpenAI finish_reason
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "max_tokens": "length", "context_full": "length",
                  "cancelled": "stop", "error": "stop"}


# ----------------------------------------------------------------------------------------------------------------
# errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


class _ClientGone(Exception):
    """The client closed the connection; its generation has been cancelled."""


def _sedac_error(exc: SedacError, prompt_param: str) -> APIError:
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param=prompt_param, code="context_length_exceeded")
    return APIError(400, str(exc))


def _generation_error(exc: Exception, prompt_param: str) -> APIError:
    """What a failed generation answers: 400 for a user-caused SedacError, else 500 (and a logged traceback)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SedacError):
        return _sedac_error(exc, prompt_param)
    log.error("generation failed", exc_info=exc)
    return APIError(500, f"the generation failed: {exc}", type="server_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request body")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON; send a JSON object "
                        "(Content-Type: application/json)")
    if kind == "missing" and not loc:
        return APIError(400, "the request body is missing; send a JSON object")
    if not loc:  # a body that is not a JSON object (or was sent without Content-Type: application/json)
        return APIError(400, "the request body must be a JSON object, sent with Content-Type: application/json")
    param = ".".join(loc) or None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "missing":
        return APIError(400, f"missing required parameter: '{param}'", param=param, code="missing_required_parameter")
    value = err.get("input")
    shown = f" (got {value!r})" if isinstance(value, (int, float, str, bool)) and len(repr(value)) < 80 else ""
    return APIError(400, f"invalid value for '{param}': {msg[:1].lower() + msg[1:]}{shown}", param=param,
                    code="invalid_value")


# ----------------------------------------------------------------------------------------------------------------
# request bodies: unknown fields are ignored, as OpenAI does


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SedacOptions(_Body):
    """The `sedac` object of a request: SEDAC's own knobs, per request."""

    events: bool = False  # stream every engine event (token, o1, ...) as extra `sedac_event` data
    mode: str | None = None
    tau_low: float | None = Field(None, ge=0.0, le=32.0)
    tau_high: float | None = Field(None, ge=0.0, le=32.0)
    ignore_eos: bool = False  # never stop at EOS: exactly max_tokens tokens (benchmarks)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str | None = None  # one model per process: any name is answered by it
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: Any = Field(None, validate_default=True)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # accepted, not applied
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)  # accepted, not applied
    sedac: SedacOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("stop must be a string or a list of strings")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(value)}")
        return tuple(s for s in value if s)

    @field_validator("n")
    @classmethod
    def _n(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported (one choice per request)")
        return value


class ChatMessage(_Body):
    role: str
    content: Any = None

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value == "developer":  # OpenAI's newer name for the system role
            return "system"
        if value not in ("system", "user", "assistant"):
            raise ValueError(f"role '{value}' is not supported; use system, user or assistant")
        return value

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            parts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                parts.append(part["text"])
            return "".join(parts)
        raise ValueError("content must be a string or a list of text parts")


class ChatCompletionBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class CompletionBody(_Sampling):
    prompt: Any
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> str:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if not isinstance(value, str):
            raise ValueError("prompt must be a string (token arrays and batches of prompts are not supported)")
        if not value:
            raise ValueError("prompt is empty")
        return value


# ----------------------------------------------------------------------------------------------------------------
# the queue: one inference thread, a bounded number of waiting requests


_END = object()  # the worker finished a job (after its generation_end)


@dataclass(eq=False)  # hashed by identity: the server keeps a set of live jobs
class _Job:
    request: GenerationRequest
    options: SedacOptions
    raw_prompt: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def put(self, item: Any) -> None:
        """Hand an event (or the end, or an exception) from the inference thread to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody is listening
            self.cancel.set()


class _RawText:
    """Stands in for the bundle's ChatFormat during a raw-text completion: the prompt is tokenized as it is, with no
    chat template and no chat stop strings. Used only until GenerationRequest can say `raw_prompt=True` itself."""

    has_template = False
    stop_strings: tuple[str, ...] = ()

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self.tokenizer(messages[-1]["content"], add_special_tokens=True)["input_ids"])


_ENGINE_HAS_RAW_PROMPT = any(f.name == "raw_prompt" for f in dataclasses.fields(GenerationRequest))


class _Metrics:
    """Prometheus instruments in a registry of this app's own (no process-global state)."""

    def __init__(self, state: "_ServerState") -> None:
        r = self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self.total_tokens = 0
        self.total_seconds = 0.0
        self.total_generations = 0
        self.weighted_skip = 0.0
        self.weighted_exit = 0.0
        self.last_tok_per_s = 0.0
        self.requests = Counter("sedac_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.rejected = Counter("sedac_rejected_requests", "Requests turned away with 503 because the queue was full",
                                registry=r)
        self.generations = Counter("sedac_generations", "Generations finished, by stop reason", ["stop_reason"],
                                   registry=r)
        self.prompt_tokens = Counter("sedac_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("sedac_generated_tokens", "Tokens generated", registry=r)
        self.generation_seconds = Counter("sedac_generation_seconds", "Time spent generating", registry=r)
        self.o1_triggers = Counter("sedac_o1_triggers", "Positions that triggered O1 deep reasoning", registry=r)
        Gauge("sedac_tokens_per_second", "Generated tokens per second of generation time, all generations",
              registry=r).set_function(lambda: self.total_tokens / self.total_seconds if self.total_seconds else 0.0)
        Gauge("sedac_last_tokens_per_second", "Tokens per second of the last generation",
              registry=r).set_function(lambda: self.last_tok_per_s)
        Gauge("sedac_skip_ratio", "Share of decoder layers skipped, token-weighted over all generations",
              registry=r).set_function(lambda: self.weighted_skip / self.total_tokens if self.total_tokens else 0.0)
        Gauge("sedac_avg_exit_layer", "Average exit layer, token-weighted over all generations",
              registry=r).set_function(lambda: self.weighted_exit / self.total_tokens if self.total_tokens else 0.0)
        Gauge("sedac_queue_depth", "Requests waiting for the engine", registry=r).set_function(lambda: state.waiting)
        Gauge("sedac_queue_capacity", "Requests that may wait before new ones get 503",
              registry=r).set_function(lambda: state.queue_size)
        Gauge("sedac_generation_running", "1 while a generation runs", registry=r).set_function(lambda: state.running)

    def record(self, start: GenerationStart | None, end: GenerationEnd) -> None:
        self.generations.labels(end.stop_reason or "unknown").inc()
        self.generated_tokens.inc(end.tokens)
        self.generation_seconds.inc(end.elapsed_s)
        self.o1_triggers.inc(end.o1_triggers)
        if start is not None:
            self.prompt_tokens.inc(start.prompt_tokens)
        with self._lock:
            self.total_generations += 1
            self.total_tokens += end.tokens
            self.total_seconds += end.elapsed_s
            self.weighted_skip += end.skip_ratio * end.tokens
            self.weighted_exit += end.avg_exit_layer * end.tokens
            self.last_tok_per_s = end.tok_per_s

    def mean_generation_s(self) -> float:
        with self._lock:
            return self.total_seconds / self.total_generations if self.total_generations else 1.0


class _ServerState:
    def __init__(self, engine_or_factory: SedacEngine | EngineFactory, queue_size: int,
                 model_name: str | None) -> None:
        if queue_size < 0:
            raise ConfigError(f"queue size is {queue_size}; it must be 0 or more")
        self.engine: SedacEngine | None = None
        self.factory: EngineFactory | None = None
        if isinstance(engine_or_factory, SedacEngine):
            self.engine = engine_or_factory
        elif callable(engine_or_factory):
            self.factory = engine_or_factory
        else:
            raise TypeError("create_app needs a SedacEngine or a function that returns one")
        self._model_name = model_name
        self.queue_size = queue_size
        self.load_error: str | None = None
        self.created = int(time.time())
        self.waiting = 0
        self.running = 0
        self._lock = threading.Lock()
        self._jobs: set[_Job] = set()
        self.executor: ThreadPoolExecutor | None = None
        self.metrics = _Metrics(self)

    # -- lifecycle -----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sedac-inference")
        if self.engine is None and self.factory is not None:
            self.executor.submit(self._load)

    def _load(self) -> None:
        assert self.factory is not None
        try:
            self.engine = self.factory()
        except Exception as exc:  # reported by /health and every request
            log.exception("loading the model failed")
            self.load_error = str(exc) or type(exc).__name__

    def stop(self) -> None:
        with self._lock:
            for job in self._jobs:
                job.cancel.set()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    @property
    def model_name(self) -> str:
        if self._model_name:
            return self._model_name
        return self.engine.bundle.name if self.engine is not None else "loading"

    def ready_engine(self) -> SedacEngine:
        if self.engine is not None:
            return self.engine
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", type="server_error",
                           code="model_load_failed")
        raise APIError(503, "the model is still loading; retry shortly", type="server_error", code="model_loading",
                       headers={"Retry-After": "5"})

    # -- the queue ----------------------------------------------------------------------------------------------
    def submit(self, job: _Job) -> None:
        with self._lock:
            if self.running + self.waiting > self.queue_size:
                busy = True
            else:
                busy = False
                self.waiting += 1
                self._jobs.add(job)
        if busy:
            self.metrics.rejected.inc()
            retry = min(60, max(1, math.ceil(self.mean_wait_s())))
            raise APIError(503, f"the server is busy ({self.queue_size} requests already waiting); retry in "
                           f"{retry} s", type="server_error", code="queue_full", headers={"Retry-After": str(retry)})
        assert self.executor is not None
        self.executor.submit(self._run, job)

    def mean_wait_s(self) -> float:
        return self.metrics.mean_generation_s() * (self.waiting + 1)

    def _run(self, job: _Job) -> None:
        """On the inference thread: one generation, its events streamed back to the request's loop."""
        with self._lock:
            self.waiting -= 1
            self.running += 1
        try:
            if job.cancel.is_set():  # the client left while it was queued
                job.put(_ClientGone())
                return
            engine = self.ready_engine()
            start: GenerationStart | None = None
            with self._thresholds(engine, job.options), self._prompt_format(engine, job.raw_prompt):
                for event in engine.stream(job.request, job.cancel):
                    if isinstance(event, GenerationStart):
                        start = event
                    elif isinstance(event, GenerationEnd):
                        self.metrics.record(start, event)
                    job.put(event)
            job.put(_END)
        except BaseException as exc:  # handed to the request, which answers with an error
            job.put(exc)
        finally:
            with self._lock:
                self.running -= 1
                self._jobs.discard(job)

    @contextmanager
    def _thresholds(self, engine: SedacEngine, options: SedacOptions) -> Iterator[None]:
        """Per-request thresholds: set for this generation, the server's own restored afterwards."""
        if options.tau_low is None and options.tau_high is None:
            yield
            return
        saved = (engine.tau_low, engine.tau_high)
        was_adapting = engine.adaptive_paused is False
        engine.set_thresholds(options.tau_low, options.tau_high, source="api")  # pauses adaptation meanwhile
        try:
            yield
        finally:
            engine.set_thresholds(*saved, source="api")
            if was_adapting:
                engine.set_adaptive(True)

    @staticmethod
    @contextmanager
    def _prompt_format(engine: SedacEngine, raw_prompt: bool) -> Iterator[None]:
        if not raw_prompt or _ENGINE_HAS_RAW_PROMPT:
            yield
            return
        # only the inference thread uses the engine, so the swap is seen by this generation alone
        bundle = engine.bundle
        chat = bundle.chat
        bundle.chat = _RawText(bundle.tokenizer)
        try:
            yield
        finally:
            bundle.chat = chat


async def _next_events(job: _Job, request: Request) -> AsyncIterator[Event]:
    """The job's events as they come, watching the client: if it disconnects, the generation is cancelled."""
    getter: asyncio.Future | None = None
    checked = time.monotonic()
    try:
        while True:
            if getter is None:
                getter = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            now = time.monotonic()
            if not done or now - checked >= DISCONNECT_POLL_S:  # also while events flow
                checked = now
                if await request.is_disconnected():
                    job.cancel.set()
                    raise _ClientGone()
            if not done:
                continue
            item = getter.result()
            getter = None
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if getter is not None:
            getter.cancel()


# ----------------------------------------------------------------------------------------------------------------
# responses


def _sedac_summary(engine: SedacEngine, start: GenerationStart | None, end: GenerationEnd) -> dict[str, Any]:
    return {
        "mode": start.mode if start else engine.mode,
        "skip_ratio": round(end.skip_ratio, 4),
        "avg_exit_layer": round(end.avg_exit_layer, 3),
        "o1_triggers": end.o1_triggers,
        "tok_per_s": round(end.tok_per_s, 3),
        "tokens": end.tokens,
        "num_layers": engine.num_layers,
        "tau_low": start.tau_low if start else engine.tau_low,
        "tau_high": start.tau_high if start else engine.tau_high,
        "stop_reason": end.stop_reason,
        "elapsed_s": round(end.elapsed_s, 4),
        "prefill_s": round(end.prefill_s, 4),
    }


def _usage(start: GenerationStart | None, end: GenerationEnd) -> dict[str, int]:
    prompt = start.prompt_tokens if start else 0
    return {"prompt_tokens": prompt, "completion_tokens": end.tokens, "total_tokens": prompt + end.tokens}


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass
class _Call:
    """One API call being answered: its kind (chat or text completion), ids and the generation behind it."""

    chat: bool
    model: str
    fingerprint: str
    job: _Job
    events: AsyncIterator[Event]
    echo_prefix: str = ""
    include_usage: bool = False
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
               "system_fingerprint": self.fingerprint, "choices": choices}
        out.update(extra)
        return out

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        if self.include_usage:
            extra.setdefault("usage", None)
        return _sse(self.envelope(obj, choices, **extra))

    def delta_choice(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


# ----------------------------------------------------------------------------------------------------------------
# the app


def create_app(engine_or_factory: SedacEngine | EngineFactory, *, api_key: str | None = None,
               queue_size: int = DEFAULT_QUEUE_SIZE, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving one engine (or the engine a factory loads on startup, on the inference thread).

    `queue_size` requests may wait while one runs; more get 503 with Retry-After. With `api_key`, every /v1 route
    and /metrics need `Authorization: Bearer <api_key>`; /health stays open for probes."""
    state = _ServerState(engine_or_factory, queue_size, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.stop)

    app = FastAPI(title="SEDAC Chat (OpenAI-compatible)", lifespan=lifespan)
    app.state.sedac = state

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key; send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, type=kind, code=code, headers=exc.headers).response()

    app.add_middleware(_CountRequests, metrics=state.metrics)

    api = APIRouter(dependencies=[Depends(check_key)])

    @app.get("/health")
    async def health() -> JSONResponse:
        status = "ok" if state.engine is not None else ("error" if state.load_error else "loading")
        body: dict[str, Any] = {"status": status, "model": state.model_name,
                                "queue": {"running": state.running, "waiting": state.waiting,
                                          "capacity": state.queue_size}}
        if state.engine is not None:
            body.update(num_layers=state.engine.num_layers, mode=state.engine.mode)
        if state.load_error:
            body["error"] = state.load_error
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "sedac"}

    @api.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @api.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != state.model_name:
            raise APIError(404, f"the model '{model_id}' does not exist; this server serves '{state.model_name}'",
                           param="model", code="model_not_found")
        return model_card()

    def generation_request(engine: SedacEngine, body: _Sampling, default_max: int, **prompt: Any) -> GenerationRequest:
        gen = engine.config.generation
        opts = body.sedac or SedacOptions()
        if opts.mode is not None and opts.mode not in (*engine.available_modes, "auto"):
            raise APIError(400, f"unknown mode '{opts.mode}'; available modes: {', '.join(engine.available_modes)}",
                           param="sedac.mode", code="invalid_value")
        temperature = gen.temperature if body.temperature is None else body.temperature
        top_p = gen.top_p if body.top_p is None else body.top_p
        if top_p == 0.0:  # the nucleus is the top token alone: greedy
            temperature, top_p = 0.0, 1.0
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens or default_max
        return GenerationRequest(
            max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
            seed=gen.seed if body.seed is None else body.seed, stop=body.stop, mode=opts.mode,
            ignore_eos=opts.ignore_eos, **prompt,
        )

    async def start_call(request: Request, body: _Sampling, chat: bool, gen_request: GenerationRequest,
                         raw_prompt: bool, echo_prefix: str = "") -> tuple[_Call, GenerationStart]:
        engine = state.ready_engine()
        job = _Job(gen_request, body.sedac or SedacOptions(), raw_prompt, asyncio.get_running_loop())
        state.submit(job)
        events = _next_events(job, request)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        call = _Call(chat, state.model_name, f"sedac-{engine.bundle.fingerprint}", job, events, echo_prefix,
                     include_usage)
        try:  # wait for the generation to start, so a bad prompt is still an HTTP error, not a broken stream
            first = await anext(events)
            while not isinstance(first, GenerationStart):  # nothing comes before it today; tolerate it if it does
                first = await anext(events)
        except StopAsyncIteration:
            raise APIError(500, "the generation ended before it started", type="server_error") from None
        except _ClientGone:
            raise
        except Exception as exc:
            raise _generation_error(exc, "messages" if chat else "prompt") from None
        return call, first

    async def answer(request: Request, body: _Sampling, chat: bool, gen_request: GenerationRequest,
                     raw_prompt: bool = False, echo_prefix: str = "") -> Response:
        try:
            call, start = await start_call(request, body, chat, gen_request, raw_prompt, echo_prefix)
        except _ClientGone:
            return Response(status_code=499)  # nobody is listening; the status only shows in logs and metrics
        engine = state.ready_engine()
        opts = body.sedac or SedacOptions()
        if body.stream:
            return StreamingResponse(_stream(call, start, engine, opts.events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(call, start, engine, opts.events)

    async def _complete(call: _Call, start: GenerationStart, engine: SedacEngine, want_events: bool) -> Response:
        collected: list[Event] = [start]
        try:
            async for event in call.events:
                collected.append(event)
        except _ClientGone:
            return Response(status_code=499)
        except Exception as exc:
            raise _generation_error(exc, "messages" if call.chat else "prompt") from None
        end = collected[-1]
        if not isinstance(end, GenerationEnd):
            raise APIError(500, "the generation ended without its summary", type="server_error")
        finish = FINISH_REASONS.get(end.stop_reason, "stop")
        sedac = _sedac_summary(engine, start, end)
        if want_events:
            sedac["events"] = [e.to_json() for e in collected]
        if call.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": end.text, "refusal": None},
                      "logprobs": None, "finish_reason": finish}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": call.echo_prefix + end.text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return JSONResponse(call.envelope(obj, [choice], usage=_usage(start, end), sedac=sedac))

    async def _stream(call: _Call, start: GenerationStart, engine: SedacEngine, want_events: bool
                      ) -> AsyncIterator[str]:
        finished = False
        sent = call.echo_prefix if not call.chat else ""
        try:
            if want_events:
                yield call.chunk([], sedac_event=start.to_json())
            if call.chat:
                yield call.chunk([call.delta_choice("", role=True)])
            elif call.echo_prefix:
                yield call.chunk([call.delta_choice(call.echo_prefix)])
            async for event in call.events:
                if isinstance(event, TokenEvent):
                    if event.text or want_events:
                        sent += event.text
                        extra = {"sedac_event": event.to_json()} if want_events else {}
                        yield call.chunk([call.delta_choice(event.text)], **extra)
                elif isinstance(event, GenerationEnd):
                    full = call.echo_prefix + event.text if not call.chat else event.text
                    if len(full) > len(sent) and full.startswith(sent):
                        # text the token deltas held back (an incomplete UTF-8 sequence at the very end)
                        yield call.chunk([call.delta_choice(full[len(sent):])])
                    if want_events:
                        yield call.chunk([], sedac_event=event.to_json())
                    finish = FINISH_REASONS.get(event.stop_reason, "stop")
                    yield call.chunk([call.delta_choice(None if call.chat else "", finish)],
                                     sedac=_sedac_summary(engine, start, event))
                    if call.include_usage:
                        yield _sse(call.envelope("chat.completion.chunk" if call.chat else "text_completion", [],
                                                 usage=_usage(start, event)))
                elif want_events:
                    yield call.chunk([], sedac_event=event.to_json())
            finished = True
            yield "data: [DONE]\n\n"
        except _ClientGone:
            return
        except Exception as exc:  # headers are sent: report in the stream, as OpenAI does
            yield _sse(_generation_error(exc, "messages" if call.chat else "prompt").body)
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (the response task was cancelled) or the stream broke
                call.job.cancel.set()
            await call.events.aclose()

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionBody, request: Request) -> Response:
        engine = state.ready_engine()
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        req = generation_request(engine, body, engine.config.generation.max_new_tokens, messages=messages)
        return await answer(request, body, True, req)

    @api.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        engine = state.ready_engine()
        prompt: dict[str, Any] = {"prompt": body.prompt}
        if _ENGINE_HAS_RAW_PROMPT:
            prompt["raw_prompt"] = True
        req = generation_request(engine, body, COMPLETIONS_DEFAULT_MAX_TOKENS, **prompt)
        return await answer(request, body, False, req, raw_prompt=True,
                            echo_prefix=body.prompt if body.echo else "")

    app.include_router(api)
    return app


class _CountRequests:
    """ASGI middleware: counts answered requests by route and status (for /metrics)."""

    def __init__(self, app: Any, metrics: _Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"  # unmatched paths share one label
            self.metrics.requests.labels(endpoint, str(status[0])).inc()


# ----------------------------------------------------------------------------------------------------------------
# running it


def is_loopback(host: str) -> bool:
    """True when every address `host` names is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def check_listen_address(host: str, api_key: str | None) -> None:
    """Without an API key the server may only listen on loopback."""
    if not api_key and not is_loopback(host):
        raise ConfigError(f"--host {host} is not a loopback address; serving other machines needs an API key "
                          f"(--api-key or {API_KEY_ENV})")


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is a one-line error, not a uvicorn traceback."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, IndexError) as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc}); check --host") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # connections wait in the backlog until uvicorn accepts them, instead of being refused
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port (or stop what "
                          "is using it)") from None
    return sock


def serve(engine_or_factory: SedacEngine | EngineFactory, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, queue_size: int = DEFAULT_QUEUE_SIZE, model_name: str | None = None,
          log_level: str = "info", echo: Callable[[str], None] = print) -> None:
    """Serve until interrupted (Ctrl+C)."""
    import uvicorn

    api_key = api_key or None
    check_listen_address(host, api_key)
    app = create_app(engine_or_factory, api_key=api_key, queue_size=queue_size, model_name=model_name)
    sock = bind_socket(host, port)
    bound_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    echo(f"serving {app.state.sedac.model_name} at http://{shown}:{bound_port}/v1 (OpenAI-compatible; "
         f"/health, /metrics)")
    if api_key is None:
        echo(f"no API key: listening on loopback only; set --api-key or {API_KEY_ENV} to serve other hosts")
    config = uvicorn.Config(app, host=host, port=bound_port, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
