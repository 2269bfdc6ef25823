"""The Python API: `create_pipeline(model)(prompt) -> GenerationResult`."""

from __future__ import annotations

from typing import Any

from .config import SedacConfig
from .engine import GenerationRequest, GenerationResult, SedacEngine
from .events import EventBus
from .models import ModelBundle, load_model


class SedacPipeline:
    """A loaded model + engine. Calling it generates one answer; keyword arguments are GenerationRequest fields."""

    def __init__(self, engine: SedacEngine) -> None:
        self.engine = engine

    @property
    def bundle(self) -> ModelBundle:
        return self.engine.bundle

    @property
    def bus(self) -> EventBus:
        return self.engine.bus

    def __call__(self, prompt: str | list[dict[str, str]], **kwargs: Any) -> GenerationResult:
        gen = self.engine.config.generation
        fields = dict(max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                      seed=gen.seed, system=gen.system_prompt)
        fields.update(kwargs)
        if isinstance(prompt, str):
            request = GenerationRequest(prompt=prompt, **fields)
        else:
            request = GenerationRequest(messages=list(prompt), **fields)
        return self.engine.generate(request)


def create_pipeline(
    model: str | ModelBundle | None = None,
    *,
    local: bool = False,
    config: SedacConfig | None = None,
    device: str | None = None,
    dtype: str | None = None,
    bus: EventBus | None = None,
) -> SedacPipeline:
    """Load `model` (None: the embedded default; a path, a .gguf file, a hub id, or a ModelBundle)."""
    config = config or SedacConfig()
    if isinstance(model, ModelBundle):
        bundle = model
    else:
        spec = model if model is not None else config.model.model_name
        bundle = load_model(spec, local=local or config.model.local, device=device or config.model.device,
                            dtype=dtype or config.model.dtype)
    return SedacPipeline(SedacEngine(bundle, config, bus))
