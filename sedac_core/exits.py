"""Exit heads: per exit layer, a translator (an affine map, tuned-lens style) that turns the layer's hidden state
into an estimate of the final hidden state, so that `lm_head(norm(translator(h_l)))` predicts the final
distribution; and a probe (a linear map on the translated state) that estimates that exit's entropy in bits, so
the exit decision costs ~one dot product instead of a full-vocabulary LM head; and a gate (a linear map on the
layer's raw hidden state) that estimates the exit signal before the translator runs, so that a token far from
exiting skips the check. Trained from the model's own generations; saved as safetensors + JSON in a per-model
profile."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import SedacError
from .paths import cache_dir

PROFILE_VERSION = 1
Progress = Callable[[str, float], None]  # (message, fraction done 0..1)


class ProfileError(SedacError):
    """A profile is missing, corrupt or made for another model."""


def default_exit_layers(num_layers: int) -> list[int]:
    """Checked layers (1-based: the output of layer l), from one third of the depth to just below the top."""
    fracs = (0.34, 0.47, 0.6, 0.7, 0.8, 0.9)
    layers = sorted({max(1, min(num_layers - 1, round(f * num_layers))) for f in fracs})
    return layers


@dataclass
class ExitHeads:
    layers: list[int]
    hidden_size: int
    translator_w: dict[int, torch.Tensor]  # [H, H]: t = h @ W + b   (input-major, as the engine multiplies)
    translator_b: dict[int, torch.Tensor]  # [H]
    probe_w: dict[int, torch.Tensor]  # [H]: predicted exit entropy (bits) = norm(t) . w + c
    probe_b: dict[int, float]
    meta: dict[str, Any] = field(default_factory=dict)
    # token ids the model itself emits, most frequent first (lossless mode drafts over the leading ones)
    draft_vocab: torch.Tensor | None = None
    # the model's own text: its greedy next token at every position of its answers to the training prompts, one
    # prompt after another, each ended by -1 (lossless mode drafts continuations from it: speculative.Continuations)
    draft_text: torch.Tensor | None = None
    # the gate, per layer: [H] and a bias, estimating the exit signal (bits) from the raw hidden state h_l (before
    # the translator): h_l . w + c. Empty in profiles trained before it: every token is checked then.
    gate_w: dict[int, torch.Tensor] = field(default_factory=dict)
    gate_b: dict[int, float] = field(default_factory=dict)

    def translate(self, layer: int, h: torch.Tensor, linear: Callable[..., torch.Tensor] | None = None
                  ) -> torch.Tensor:
        """h @ W + b. `linear` (F.linear's signature; the engine passes its matmul, e.g. the skinny-matmul
        kernel, which takes the input-major W as W.t()) replaces torch's addmm."""
        if linear is not None:
            return linear(h, self.translator_w[layer].t(), self.translator_b[layer])
        return torch.addmm(self.translator_b[layer], h.reshape(-1, h.shape[-1]), self.translator_w[layer]).view_as(h)

    def predicted_entropy(self, layer: int, normed_t: torch.Tensor) -> torch.Tensor:
        return normed_t @ self.probe_w[layer] + self.probe_b[layer]

    def gate_estimate(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The gate's estimate of the exit signal (bits) from the raw hidden state h [..., H]."""
        return h @ self.gate_w[layer] + self.gate_b[layer]

    def to(self, device: Any, dtype: torch.dtype) -> "ExitHeads":
        conv = lambda d: {k: v.to(device=device, dtype=dtype) for k, v in d.items()}  # noqa: E731
        return ExitHeads(self.layers, self.hidden_size, conv(self.translator_w), conv(self.translator_b),
                         conv(self.probe_w), dict(self.probe_b), dict(self.meta), self.draft_vocab, self.draft_text,
                         conv(self.gate_w), dict(self.gate_b))

    # -- persistence ------------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write atomically: a half-written profile is never picked up."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for l in self.layers:
            tensors[f"translator.{l}.weight"] = self.translator_w[l].float().contiguous()
            tensors[f"translator.{l}.bias"] = self.translator_b[l].float().contiguous()
            tensors[f"probe.{l}.weight"] = self.probe_w[l].float().contiguous()
            if l in self.gate_w:
                tensors[f"gate.{l}.weight"] = self.gate_w[l].float().contiguous()
        if self.draft_vocab is not None:
            tensors["draft_vocab"] = self.draft_vocab.to(torch.int64).contiguous()
        if self.draft_text is not None:
            tensors["draft_text"] = self.draft_text.to(torch.int32).contiguous()
        meta = dict(self.meta)
        meta.update(version=PROFILE_VERSION, layers=self.layers, hidden_size=self.hidden_size,
                    probe_bias={str(l): float(self.probe_b[l]) for l in self.layers},
                    gate_bias={str(l): float(b) for l, b in self.gate_b.items()})
        tmp_w = directory / ".exit_heads.safetensors.tmp"
        tmp_m = directory / ".exit_heads.json.tmp"
        save_file(tensors, str(tmp_w))
        tmp_m.write_text(json.dumps(meta, indent=2))
        os.chmod(tmp_w, tmp_m.stat().st_mode & 0o777)  # safetensors writes 0600; as readable as the json
        os.replace(tmp_w, directory / "exit_heads.safetensors")
        os.replace(tmp_m, directory / "exit_heads.json")

    @classmethod
    def load(cls, directory: Path, *, hidden_size: int | None = None, fingerprint: str | None = None) -> "ExitHeads":
        from safetensors.torch import load_file

        wpath, mpath = directory / "exit_heads.safetensors", directory / "exit_heads.json"
        if not wpath.is_file() or not mpath.is_file():
            raise ProfileError(f"no exit heads in {directory}; train them with `sedac-chat train`")
        try:
            meta = json.loads(mpath.read_text())
            tensors = load_file(str(wpath))
            layers = [int(l) for l in meta["layers"]]
            hs = int(meta["hidden_size"])
            heads = cls(
                layers=layers,
                hidden_size=hs,
                translator_w={l: tensors[f"translator.{l}.weight"] for l in layers},
                translator_b={l: tensors[f"translator.{l}.bias"] for l in layers},
                probe_w={l: tensors[f"probe.{l}.weight"] for l in layers},
                probe_b={l: float(meta["probe_bias"][str(l)]) for l in layers},
                meta=meta,
                draft_vocab=tensors.get("draft_vocab"),
                draft_text=tensors.get("draft_text"),
                gate_w={l: tensors[f"gate.{l}.weight"] for l in layers if f"gate.{l}.weight" in tensors},
                gate_b={int(l): float(b) for l, b in meta.get("gate_bias", {}).items()},
            )
            if set(heads.gate_w) != set(heads.gate_b):
                raise ValueError("gate weights and biases do not match")
            for l in layers:
                if heads.translator_w[l].shape != (hs, hs) or heads.probe_w[l].shape != (hs,) or (
                        l in heads.gate_w and heads.gate_w[l].shape != (hs,)):
                    raise ValueError("tensor shapes do not match hidden_size")
        except Exception as exc:  # noqa: BLE001 - any damage is the same problem to the user
            raise ProfileError(
                f"corrupt exit-head profile in {directory} ({type(exc).__name__}: {str(exc)[:100]}); "
                "delete it and run `sedac-chat train`"
            ) from None
        if hidden_size is not None and hs != hidden_size:
            raise ProfileError(f"the profile in {directory} is for hidden size {hs}, not {hidden_size}; retrain it")
        if fingerprint is not None and meta.get("fingerprint") not in (None, fingerprint):
            raise ProfileError(f"the profile in {directory} was trained for another model; retrain it")
        return heads


# ----------------------------------------------------------------------------------------------------------------
# profiles


def user_profile_dir(fingerprint: str) -> Path:
    return cache_dir() / "profiles" / fingerprint


def shipped_profile_dir(fingerprint: str) -> Path | None:
    root = resources.files("sedac_core") / "profiles" / fingerprint
    p = Path(str(root))
    return p if (p / "exit_heads.json").is_file() else None


def find_profile(fingerprint: str) -> Path | None:
    """The user's own trained profile first, then the one shipped with the package."""
    user = user_profile_dir(fingerprint)
    if (user / "exit_heads.json").is_file():
        return user
    return shipped_profile_dir(fingerprint)


# ----------------------------------------------------------------------------------------------------------------
# training data: the model's own generations


SHIPPED_PROMPTS = {"train": "train_prompts.txt", "calibration": "calibration_prompts.txt"}


def load_prompts(path: Path | None = None, shipped: str = "train") -> list[str]:
    """The prompts in `path` (one per line), or a set shipped with the package: "train" (what `train` collects the
    model's answers to) or "calibration" (other prompts, for thresholds that hold on text the heads never saw)."""
    if path is None:
        text = (resources.files("sedac_core") / "data" / SHIPPED_PROMPTS[shipped]).read_text(encoding="utf-8")
    else:
        if not path.is_file():
            raise SedacError(f"prompt file not found: {path}; give a text file with one prompt per line")
        text = path.read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SedacError(f"no prompts in {path}; give a text file with one prompt per line")
    return prompts


@dataclass
class ExitData:
    hidden: dict[int, torch.Tensor]  # layer -> [N, H] hidden state after that layer
    final_hidden: torch.Tensor  # [N, H] the last layer's output (before the final norm)
    final_token: torch.Tensor  # [N] the full model's greedy next token
    final_entropy: torch.Tensor  # [N] bits
    group: torch.Tensor  # [N] which prompt each row came from (for held-out splits by prompt)
    # what the text around each row was, for decisions over the reduced vocabulary, which the engine extends with
    # the context's tokens (None: not collected): the token fed at each row, whether the row starts an answer, and
    # each group's prompt ids. A row's context is its prompt plus the fed tokens from its answer's start to it.
    inputs: torch.Tensor | None = None  # [N]
    first: torch.Tensor | None = None  # [N] bool
    prompt_ids: dict[int, list[int]] | None = None

    def __len__(self) -> int:
        return int(self.final_token.shape[0])

    def subset(self, idx: torch.Tensor) -> "ExitData":
        """The rows `idx` (in order; keep whole answers, e.g. whole groups, or the context loses its start)."""
        pick = (lambda t: None if t is None else t[idx])  # noqa: E731
        return ExitData({l: h[idx] for l, h in self.hidden.items()}, self.final_hidden[idx], self.final_token[idx],
                        self.final_entropy[idx], self.group[idx], pick(self.inputs), pick(self.first),
                        self.prompt_ids)

    def context_masks(self, base: torch.Tensor, vocab_size: int, start: int, stop: int) -> torch.Tensor | None:
        """[stop - start, vocab_size] bool: the reduced vocabulary each row's decision sees, `base` plus the row's
        context (as the engine's ReducedHead builds it), or None without the context data."""
        if self.inputs is None or self.first is None or self.prompt_ids is None:
            return None
        begin = start  # back to the first row of the answer `start` is in
        while begin > 0 and not bool(self.first[begin]):
            begin -= 1
        out = torch.zeros(stop - start, vocab_size, dtype=torch.bool)
        ctx = torch.zeros(vocab_size, dtype=torch.bool)
        for i in range(begin, stop):
            if bool(self.first[i]):
                ctx = torch.zeros(vocab_size, dtype=torch.bool)
                ctx[base] = True
                ids = [t for t in self.prompt_ids.get(int(self.group[i]), []) if 0 <= t < vocab_size]
                ctx[torch.tensor(ids, dtype=torch.long)] = True
            token = int(self.inputs[i])
            if 0 <= token < vocab_size:
                ctx[token] = True
            if i >= start:
                out[i - start] = ctx
        return out

    def save(self, path: Path, meta: dict[str, Any]) -> None:
        """Write the collected data with `meta` (what it was collected with) atomically: an interrupted write
        leaves no file that `load` would take."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"meta": meta, "hidden": self.hidden, "final_hidden": self.final_hidden,
                    "final_token": self.final_token, "final_entropy": self.final_entropy, "group": self.group,
                    "inputs": self.inputs, "first": self.first, "prompt_ids": self.prompt_ids}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, meta: dict[str, Any]) -> "ExitData | None":
        """The data saved at `path` if it was collected with the same `meta`, else None (collect it again). Its
        layers may be more than `meta["layers"]` (the others are dropped)."""
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - missing, truncated or foreign: collect again
            return None
        if not isinstance(raw, dict) or not isinstance(raw.get("meta"), dict):
            return None
        kept, want = dict(raw["meta"]), dict(meta)
        kept_layers, want_layers = set(kept.pop("layers", [])), list(want.pop("layers", []))
        if kept != want or not set(want_layers) <= kept_layers:
            return None
        return cls({l: raw["hidden"][l] for l in want_layers}, raw["final_hidden"], raw["final_token"],
                   raw["final_entropy"], raw["group"], raw.get("inputs"), raw.get("first"), raw.get("prompt_ids"))


@torch.inference_mode()
def collect_exit_data(bundle: Any, prompts: list[str], layers: list[int], *, max_new_tokens: int = 96,
                      batch_size: int = 16, max_tokens: int | None = None, samples: int = 0,
                      temperature: float = 0.8, seed: int = 0,
                      progress: Progress | None = None) -> ExitData:
    """Generate greedy answers to `prompts` in batches (transformers' generate, left-padded), then run the
    sequences once more to read the hidden states at `layers` and at the top for every answer position.

    `samples` adds that many sampled answers per prompt (at `temperature`, seeded): more varied text from the same
    prompts. Every position's target is still the full model's own next-token distribution there, and all answers
    to one prompt share its group, so a split by prompt keeps them on one side."""
    from .entropy import token_stats

    model, tok = bundle.model, bundle.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(bundle.eos_token_ids), 0)
    captured: dict[int, torch.Tensor] = {}
    hooks = []
    wanted = set(layers) | {bundle.num_layers}
    for i, layer in enumerate(model.model.layers):
        if i + 1 in wanted:
            hooks.append(layer.register_forward_hook(
                lambda _m, _inp, out, idx=i + 1: captured.__setitem__(idx, out[0] if isinstance(out, tuple) else out)))
    hidden: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    finals, tokens, ents, groups, inputs, firsts = [], [], [], [], [], []
    prompt_ids: dict[int, list[int]] = {}
    total = 0
    t0 = time.time()
    try:
        for b in range(0, len(prompts), batch_size):
            batch = prompts[b : b + batch_size]
            encoded = [bundle.chat.encode([{"role": "user", "content": p}]) for p in batch]
            prompt_ids.update({b + r: list(e) for r, e in enumerate(encoded)})
            width = max(len(e) for e in encoded)
            ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in encoded], device=bundle.device)
            mask = (torch.arange(width, device=bundle.device)[None, :] >= torch.tensor(
                [width - len(e) for e in encoded], device=bundle.device)[:, None]).long()
            for variant in range(1 + samples):  # 0: the greedy answers, then the sampled ones
                if variant:
                    torch.manual_seed(seed * 1_000_003 + variant * 10_007 + b)
                    how = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
                else:
                    how = dict(do_sample=False)
                out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                     **how)
                gen = out[:, width:]
                # answer length: up to and including the first EOS
                eos = torch.tensor(sorted(bundle.eos_token_ids), device=gen.device)
                is_eos = torch.isin(gen, eos)
                lengths = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1,
                                      torch.full_like(is_eos[:, 0], gen.shape[1], dtype=torch.long))
                answer = (torch.arange(gen.shape[1], device=gen.device)[None] < lengths[:, None]).long()
                captured.clear()
                logits = model(out, attention_mask=torch.cat([mask, answer], 1)).logits
                for r in range(len(batch)):
                    n = int(lengths[r])
                    # positions width-1 .. width+n-2 predict the answer tokens
                    sl = slice(width - 1, width - 1 + n)
                    for l in layers:
                        hidden[l].append(captured[l][r, sl].float().cpu())
                    finals.append(captured[bundle.num_layers][r, sl].float().cpu())
                    st = token_stats(logits[r, sl].float())
                    tokens.append(st.argmax.cpu())
                    ents.append(st.entropy_bits.cpu())
                    groups.append(torch.full((n,), b + r, dtype=torch.long))
                    inputs.append(out[r, sl].cpu())  # the last prompt token, then the answer's tokens
                    firsts.append(torch.arange(n) == 0)
                    total += n
                if progress:
                    # the run ends at the last prompt or at max_tokens, whichever comes first: the bar follows the
                    # nearer
                    done = (b + len(batch) * (variant + 1) / (1 + samples)) / len(prompts)
                    if max_tokens:
                        done = max(done, total / max_tokens)
                    progress(f"generated {total} tokens ({total / max(1e-9, time.time() - t0):.0f} tok/s)",
                             min(1.0, done))
                if max_tokens is not None and total >= max_tokens:
                    break
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        for h in hooks:
            h.remove()
    return ExitData({l: torch.cat(v) for l, v in hidden.items()}, torch.cat(finals), torch.cat(tokens),
                    torch.cat(ents), torch.cat(groups), torch.cat(inputs), torch.cat(firsts), prompt_ids)


# ----------------------------------------------------------------------------------------------------------------
# fitting


def _lm_head_parts(bundle: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
    model = bundle.model
    return model.lm_head.weight.detach().float(), model.model.norm.weight.detach().float(), float(
        getattr(model.config, "rms_norm_eps", 1e-6))


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def fit_translator(h: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares h @ W + b ~= target, with a small ridge (closed form; seconds on CPU)."""
    n, d = h.shape
    x = torch.cat([h, torch.ones(n, 1)], 1).double()
    y = target.double()
    gram = x.T @ x
    gram += ridge * torch.eye(d + 1, dtype=torch.float64) * gram.diagonal().mean()
    sol = torch.linalg.solve(gram, x.T @ y)
    return sol[:d].float().contiguous(), sol[d].float().contiguous()


KL_DTYPES = ("auto", "float32", "bfloat16")


def kl_matmul_dtype(lm_head: torch.Tensor, requested: str = "auto", batch: int = 256) -> torch.dtype:
    """The dtype of the LM-head matmuls in KL training. "auto": bfloat16 where a training-sized matmul measures
    at least 1.3x faster in it (a CPU with bf16 units, a GPU), else float32. On the default model's CPU bf16 runs
    ~2x faster and trains heads of the same held-out agreement (0.6348 against 0.6351 at layer 24 after an epoch);
    the softmax, the KL and the translator stay in float32."""
    if requested not in KL_DTYPES:
        raise SedacError(f"unknown KL precision {requested!r}; use one of {', '.join(KL_DTYPES)}")
    if requested != "auto":
        return getattr(torch, requested)
    x = torch.randn(batch, lm_head.shape[1], device=lm_head.device)
    sync = torch.cuda.synchronize if lm_head.device.type == "cuda" else (lambda: None)  # time finished work only
    times = {}
    for dtype in (torch.float32, torch.bfloat16) * 2:  # the second round counts: the first warms up
        try:
            a, w = x.to(dtype), lm_head.to(dtype)
            a @ w.T
            sync()
            t0 = time.perf_counter()
            a @ w.T
            sync()
            times[dtype] = time.perf_counter() - t0
        except RuntimeError:  # no bf16 matmul on this device
            return torch.float32
    return torch.bfloat16 if times[torch.bfloat16] * 1.3 <= times[torch.float32] else torch.float32


def refine_translator_kl(w: torch.Tensor, b: torch.Tensor, h: torch.Tensor, final_hidden: torch.Tensor,
                         lm_head: torch.Tensor, norm_w: torch.Tensor, eps: float, *, epochs: int = 2,
                         batch: int = 256, lr: float = 3e-4, vocab: torch.Tensor | None = None,
                         matmul_dtype: torch.dtype = torch.float32,
                         progress: Callable[[float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A few epochs of KL(final || exit) over the vocabulary `vocab` (default: all), from the least-squares start.
    `matmul_dtype` is the LM-head matmuls' (see kl_matmul_dtype); all else runs in float32."""
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True)
    head = (lm_head if vocab is None else lm_head[vocab]).to(matmul_dtype)

    def log_probs(hidden: torch.Tensor) -> torch.Tensor:  # final norm, LM head (in matmul_dtype), log-softmax
        return F.log_softmax((_norm(hidden, norm_w, eps).to(matmul_dtype) @ head.T).float(), -1)

    opt = torch.optim.Adam([w, b], lr=lr)
    n = h.shape[0]
    steps = epochs * math.ceil(n / batch)
    step = 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, batch):
            idx = order[s : s + batch]
            with torch.no_grad():
                target = log_probs(final_hidden[idx])
            pred = log_probs(h[idx] @ w + b)
            loss = F.kl_div(pred, target, log_target=True, reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if progress:
                progress(step / steps)
    return w.detach(), b.detach()


def exit_stats(heads: ExitHeads, data: ExitData, bundle: Any, batch: int = 2048, *,
               decision_vocab: torch.Tensor | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Per exit layer: the exit head's argmax ("token"), its real entropy, the exit signal ("predicted") and
    whether the exit token agrees with the full model. The signal is the probe's estimated entropy, or with
    `decision_vocab` (the "reduced" signal) the entropy over those ids only (plus each row's context tokens when
    `data` has them, as in the engine), whose argmax is then the exit token. Either way, also the argmax over the
    full vocabulary ("full_token") and the probe's estimate ("probe")."""
    from .entropy import token_stats

    lm_head, norm_w, eps = _lm_head_parts(bundle)
    out: dict[int, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for l in heads.layers:
            tok, ent, pred, full_tok, probe = [], [], [], [], []
            for s in range(0, len(data), batch):
                t = data.hidden[l][s : s + batch] @ heads.translator_w[l] + heads.translator_b[l]
                nt = _norm(t, norm_w, eps)
                logits = nt @ lm_head.T
                st = token_stats(logits)  # the fused kernel: entropy and argmax in one pass
                ent.append(st.entropy_bits)
                full_tok.append(st.argmax)
                probe.append(nt @ heads.probe_w[l] + heads.probe_b[l])
                if decision_vocab is None:
                    tok.append(full_tok[-1])
                    pred.append(probe[-1])
                elif (allowed := data.context_masks(decision_vocab, logits.shape[-1], s, s + len(logits))) is None:
                    rs = token_stats(logits[:, decision_vocab])
                    tok.append(decision_vocab[rs.argmax])
                    pred.append(rs.entropy_bits)
                else:  # the reduced vocabulary plus each row's context, as the engine decides
                    ms = token_stats(logits.masked_fill(~allowed, float("-inf")))
                    tok.append(ms.argmax)
                    pred.append(ms.entropy_bits)
            tok_t = torch.cat(tok)
            out[l] = {"token": tok_t, "entropy": torch.cat(ent), "predicted": torch.cat(pred),
                      "agree": (tok_t == data.final_token), "full_token": torch.cat(full_tok),
                      "probe": torch.cat(probe)}
    return out


def fit_probe(normed_t: torch.Tensor, entropy: torch.Tensor, ridge: float = 1e-2) -> tuple[torch.Tensor, float]:
    w, b = fit_translator(normed_t, entropy.unsqueeze(1), ridge)
    return w[:, 0].contiguous(), float(b[0])


def fit_gates(heads: ExitHeads, data: ExitData, signal: dict[int, torch.Tensor], ridge: float = 1e-2) -> None:
    """Fit each layer's gate: least squares from the raw hidden state to the exit signal (`signal[l]`, bits,
    per row of `data`: exit_stats' "predicted" with the decision vocabulary)."""
    for l in heads.layers:
        w, b = fit_translator(data.hidden[l], signal[l].unsqueeze(1), ridge)
        heads.gate_w[l], heads.gate_b[l] = w[:, 0].contiguous(), float(b[0])


def split_by_prompt(data: ExitData, held_out: float = 0.2, seed: int = 0) -> tuple[ExitData, ExitData]:
    groups = torch.unique(data.group)
    gen = torch.Generator().manual_seed(seed)
    perm = groups[torch.randperm(len(groups), generator=gen)]
    n_test = max(1, int(len(groups) * held_out))
    test_groups = perm[:n_test]
    is_test = torch.isin(data.group, test_groups)
    return data.subset(torch.nonzero(~is_test)[:, 0]), data.subset(torch.nonzero(is_test)[:, 0])


def train_exit_heads(bundle: Any, data: ExitData, layers: list[int], *, kl_epochs: int = 0,
                     kl_dtype: str = "auto", progress: Progress | None = None) -> tuple[ExitHeads, dict[str, Any]]:
    """Fit translators (least squares, then optional KL epochs, their LM-head matmuls in `kl_dtype`: see
    kl_matmul_dtype), probes and gates on the training split; report the held-out agreement per layer."""
    train, test = split_by_prompt(data)
    lm_head, norm_w, eps = _lm_head_parts(bundle)
    matmul_dtype = kl_matmul_dtype(lm_head, kl_dtype) if kl_epochs else torch.float32
    tw, tb, pw, pb = {}, {}, {}, {}
    for i, l in enumerate(layers):
        w, b = fit_translator(train.hidden[l], train.final_hidden)
        if kl_epochs:
            w, b = refine_translator_kl(
                w, b, train.hidden[l], train.final_hidden, lm_head, norm_w, eps, epochs=kl_epochs,
                matmul_dtype=matmul_dtype,
                progress=(lambda f, i=i: progress(f"layer {l}: KL refinement", (i + f) / len(layers)))
                if progress else None)
        tw[l], tb[l] = w, b
        if progress:
            progress(f"layer {l}: translator fitted", (i + 1) / len(layers))
    heads = ExitHeads(layers, bundle.model.config.hidden_size, tw, tb,
                      {l: torch.zeros(tw[l].shape[0]) for l in layers}, {l: 0.0 for l in layers})
    heads.draft_vocab = build_draft_vocab(train.final_token)
    # probes: predict each exit's entropy from its normalised translated state; gates: predict the exit signal
    # (the entropy over the reduced vocabulary the engine decides with) from the raw hidden state
    from .calibration import DECISION_VOCAB_SIZE

    vocab = reduced_base_vocab(heads.draft_vocab, lm_head.shape[0], DECISION_VOCAB_SIZE)
    stats_train = exit_stats(heads, train, bundle, decision_vocab=vocab)
    for l in layers:
        nt = _norm(train.hidden[l] @ tw[l] + tb[l], norm_w, eps)
        heads.probe_w[l], heads.probe_b[l] = fit_probe(nt, stats_train[l]["entropy"])
    fit_gates(heads, train, {l: stats_train[l]["predicted"] for l in layers})
    stats_test = exit_stats(heads, test, bundle, decision_vocab=vocab)
    rate = lambda x: round(float(x.float().mean()), 4)  # noqa: E731
    corr = lambda a, b: round(float(torch.corrcoef(torch.stack([a, b]))[0, 1]), 4)  # noqa: E731
    report = {
        "train_tokens": len(train),
        "kl_matmul_dtype": str(matmul_dtype).removeprefix("torch.") if kl_epochs else None,
        "held_out_tokens": len(test),
        "held_out_agreement": {l: rate(stats_test[l]["full_token"] == test.final_token) for l in layers},
        # exiting with the argmax over the reduced vocabulary, as the engine does (held_out_agreement: full)
        "train_agreement_reduced": {l: rate(stats_train[l]["agree"]) for l in layers},
        "held_out_agreement_reduced": {l: rate(stats_test[l]["agree"]) for l in layers},
        "probe_corr": {l: corr(stats_test[l]["probe"], stats_test[l]["entropy"]) for l in layers},
        "gate_corr": {l: corr(heads.gate_estimate(l, test.hidden[l]), stats_test[l]["predicted"]) for l in layers},
    }
    heads.meta.update(report)
    heads.draft_text = build_draft_text(data.final_token, data.group)
    heads.meta["draft_text_tokens"] = len(data)
    return heads, report


def dedup_ids(ids: torch.Tensor) -> torch.Tensor:
    """Unique ids in first-seen order."""
    seen: dict[int, None] = dict.fromkeys(ids.tolist())
    return torch.tensor(list(seen), dtype=torch.int64)


def reduced_base_vocab(draft_vocab: torch.Tensor | None, vocab_size: int, size: int) -> torch.Tensor:
    """The reduced vocabulary's fixed part: the model's own most frequent output tokens (the profile's draft
    vocabulary), then the rest in id order, `size` ids in all."""
    own = draft_vocab.to(torch.int64) if draft_vocab is not None else torch.empty(0, dtype=torch.int64)
    own = own[(own >= 0) & (own < vocab_size)][:size]
    rest = torch.arange(min(vocab_size, size + len(own)), dtype=torch.int64)
    return dedup_ids(torch.cat([own, rest]))[:size]


def build_draft_text(tokens: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The collected answers as one int32 stream: each prompt's tokens in order, then -1 (its end)."""
    parts = []
    for g in torch.unique(groups).tolist():  # a prompt's rows keep their order; its answers run on one another
        parts += [tokens[groups == g].to(torch.int32), torch.tensor([-1], dtype=torch.int32)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int32)


def build_draft_vocab(tokens: torch.Tensor) -> torch.Tensor:
    """The distinct token ids of the model's own output, most frequent first (ties: lower id first)."""
    ids, counts = torch.unique(tokens.to(torch.int64), return_counts=True)
    order = sorted(range(len(ids)), key=lambda i: (-int(counts[i]), int(ids[i])))
    return ids[torch.tensor(order, dtype=torch.int64)] if order else ids
