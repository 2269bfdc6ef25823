"""Ghost KV: a learned predictor of the K/V that skipped layers would have written at an exited position.

Per exit layer e, a reduced-rank linear map from the normalised exit hidden state to the pre-RoPE K and V of the
layers above it: one shared trunk [H x r] and one head [r x (n_skip * kv)], so its cost grows with the rank r, not
with H x kv per skipped layer as propagation's does. The first skipped layer's input *is* the exit hidden state,
so its K/V are projected exactly (as propagation does) and only the layers above it are predicted. Fitted in closed
form (ridge least squares, then the optimal rank-r truncation of the fitted values) on the model's own full-depth
runs; saved as safetensors + JSON next to the exit heads."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ConfigError
from .exits import ExitData, ExitHeads, ProfileError, find_profile, split_by_prompt

GHOST_VERSION = 1
WEIGHTS = "ghost_kv.safetensors"
META = "ghost_kv.json"
Progress = Callable[[str, float], None]


def _unit_rms(h: torch.Tensor, eps: float) -> torch.Tensor:
    """The exit state with unit RMS: K/V depend on a layer input only through its direction and scale-free norm."""
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


@dataclass
class GhostKV:
    exit_layers: list[int]  # 1-based depths (the exit heads' layers)
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    rank: int
    eps: float
    trunk: dict[int, torch.Tensor]  # exit layer -> [H, r]
    head_w: dict[int, torch.Tensor]  # exit layer -> [r, n_pred * 2 * kv]   (layers e+1 .. L-1, 0-based, K then V)
    head_b: dict[int, torch.Tensor]  # exit layer -> [n_pred * 2 * kv]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def predicted_layers(self, exit_layer: int) -> list[int]:
        """0-based indices of the layers whose K/V are predicted for an exit after `exit_layer` layers."""
        return list(range(exit_layer + 1, self.num_layers))

    def predict(self, exit_layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [N, H] -> pre-RoPE (k, v), each [N, n_pred, kv_heads * head_dim]."""
        z = _unit_rms(h, self.eps) @ self.trunk[exit_layer]
        out = torch.addmm(self.head_b[exit_layer], z, self.head_w[exit_layer])
        out = out.view(h.shape[0], -1, 2, self.kv_size)
        return out[:, :, 0], out[:, :, 1]

    def to(self, device: Any, dtype: torch.dtype) -> "GhostKV":
        conv = lambda d: {k: v.to(device=device, dtype=dtype).contiguous() for k, v in d.items()}  # noqa: E731
        return GhostKV(list(self.exit_layers), self.num_layers, self.hidden_size, self.num_kv_heads, self.head_dim,
                       self.rank, self.eps, conv(self.trunk), conv(self.head_w), conv(self.head_b), dict(self.meta))

    def num_parameters(self) -> int:
        return sum(t.numel() for d in (self.trunk, self.head_w, self.head_b) for t in d.values())

    def macs_per_token(self, exit_layer: int) -> int:
        """Multiply-adds for one exited token: the exact first skipped layer (norm + K/V projection) plus the map."""
        n_pred = len(self.predicted_layers(exit_layer))
        exact = self.hidden_size * 2 * self.kv_size + self.hidden_size
        return exact + self.hidden_size + self.hidden_size * self.rank + self.rank * n_pred * 2 * self.kv_size

    # -- persistence ------------------------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write atomically: a half-written Ghost KV is never picked up."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for e in self.exit_layers:
            tensors[f"trunk.{e}"] = self.trunk[e].float().contiguous()
            tensors[f"head.{e}.weight"] = self.head_w[e].float().contiguous()
            tensors[f"head.{e}.bias"] = self.head_b[e].float().contiguous()
        meta = dict(self.meta)
        meta.update(version=GHOST_VERSION, exit_layers=self.exit_layers, num_layers=self.num_layers,
                    hidden_size=self.hidden_size, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                    rank=self.rank, eps=self.eps)
        tmp_w, tmp_m = directory / f".{WEIGHTS}.tmp", directory / f".{META}.tmp"
        save_file(tensors, str(tmp_w))
        tmp_m.write_text(json.dumps(meta, indent=2))
        os.chmod(tmp_w, tmp_m.stat().st_mode & 0o777)  # safetensors writes 0600; as readable as the json
        os.replace(tmp_w, directory / WEIGHTS)
        os.replace(tmp_m, directory / META)

    @classmethod
    def load(cls, directory: Path, *, hidden_size: int | None = None, num_layers: int | None = None,
             num_kv_heads: int | None = None, head_dim: int | None = None) -> "GhostKV":
        from safetensors.torch import load_file

        wpath, mpath = directory / WEIGHTS, directory / META
        if not wpath.is_file() or not mpath.is_file():
            raise ProfileError(f"no Ghost KV in {directory}; train it with `sedac-chat train --ghost-kv`")
        try:
            meta = json.loads(mpath.read_text())
            tensors = load_file(str(wpath))
            exits = [int(e) for e in meta["exit_layers"]]
            g = cls(exits, int(meta["num_layers"]), int(meta["hidden_size"]), int(meta["num_kv_heads"]),
                    int(meta["head_dim"]), int(meta["rank"]), float(meta["eps"]),
                    {e: tensors[f"trunk.{e}"] for e in exits}, {e: tensors[f"head.{e}.weight"] for e in exits},
                    {e: tensors[f"head.{e}.bias"] for e in exits}, meta)
            for e in exits:
                width = len(g.predicted_layers(e)) * 2 * g.kv_size
                if (g.trunk[e].shape != (g.hidden_size, g.rank) or g.head_w[e].shape != (g.rank, width)
                        or g.head_b[e].shape != (width,)):
                    raise ValueError(f"tensor shapes for exit layer {e} do not match the metadata")
        except Exception as exc:  # noqa: BLE001 - any damage is the same problem to the user
            raise ProfileError(f"corrupt Ghost KV in {directory} ({type(exc).__name__}: {str(exc)[:100]}); "
                               "delete it and run `sedac-chat train --ghost-kv`") from None
        for name, want, have in (("hidden size", hidden_size, g.hidden_size), ("layer count", num_layers, g.num_layers),
                                 ("KV heads", num_kv_heads, g.num_kv_heads), ("head size", head_dim, g.head_dim)):
            if want is not None and want != have:
                raise ProfileError(f"the Ghost KV in {directory} is for {name} {have}, not {want}; retrain it")
        return g


# ----------------------------------------------------------------------------------------------------------------
# targets and fitting


def _kv_modules(bundle: Any, j: int) -> tuple[Any, Any, Any]:
    layer = bundle.model.model.layers[j]
    return layer.input_layernorm, layer.self_attn.k_proj, layer.self_attn.v_proj


@torch.no_grad()
def true_kv(bundle: Any, data: ExitData, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real pre-RoPE K and V of layer j (0-based) at every row: its projections of input_layernorm(hidden[j])."""
    norm, kp, vp = _kv_modules(bundle, j)
    x = norm(data.hidden[j].to(kp.weight.dtype))
    return kp(x).float(), vp(x).float()


@torch.no_grad()
def propagated_kv(bundle: Any, data: ExitData, exit_layer: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What propagation writes for layer j after an exit at `exit_layer`: layer j's projections of the exit state."""
    norm, kp, vp = _kv_modules(bundle, j)
    x = norm(data.hidden[exit_layer].to(kp.weight.dtype))
    return kp(x).float(), vp(x).float()


def required_layers(exit_layers: list[int], num_layers: int) -> list[int]:
    """Hidden states (1-based depths) that training needs: every layer input from the lowest exit to the top."""
    return list(range(min(exit_layers), num_layers))


@torch.no_grad()
def fit_ghost_kv(bundle: Any, data: ExitData, exit_layers: list[int], *, rank: int = 128, ridge: float = 1e-3,
                 progress: Progress | None = None) -> GhostKV:
    """Closed-form reduced-rank regression per exit layer. Each target block (one layer's K, or V) is scaled to
    unit RMS first, so every layer counts alike rather than the ones with the largest activations."""
    cfg = bundle.model.config
    L, H = int(cfg.num_hidden_layers), int(cfg.hidden_size)
    n_heads = int(cfg.num_attention_heads)
    kvh = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    hd = int(getattr(cfg, "head_dim", None) or H // n_heads)
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
    missing = [l for l in required_layers(exit_layers, L) if l not in data.hidden]
    if missing:
        raise ValueError(f"the training data lacks hidden states for layers {missing}")
    targets = {j: torch.cat(true_kv(bundle, data, j), 1) for j in range(min(exit_layers) + 1, L)}  # [N, 2kv]
    trunk, head_w, head_b = {}, {}, {}
    r_eff = rank
    for i, e in enumerate(exit_layers):
        layers = list(range(e + 1, L))
        x = _unit_rms(data.hidden[e].float(), eps).double()
        x_mean = x.mean(0)
        xc = x - x_mean
        if not layers:  # exiting just below the top: only the exactly projected layer is skipped
            trunk[e] = torch.zeros(H, rank)
            head_w[e], head_b[e] = torch.zeros(rank, 0), torch.zeros(0)
            continue
        y = torch.cat([targets[j] for j in layers], 1).double()  # [N, n_pred * 2kv]
        y_mean = y.mean(0)
        blocks = y.shape[1] // (kvh * hd)
        scale = (y - y_mean).view(y.shape[0], blocks, -1).pow(2).mean((0, 2)).sqrt().clamp_min(1e-8)
        scale = scale.repeat_interleave(kvh * hd)
        yc = (y - y_mean) / scale
        gram = xc.T @ xc
        gram += ridge * gram.diagonal().mean() * torch.eye(H, dtype=torch.float64)
        w = torch.linalg.solve(gram, xc.T @ yc)  # [H, out]: full-rank least squares
        chol = torch.linalg.cholesky(gram)
        # right singular vectors of the fitted values xc @ w, through the Cholesky factor (no N x out matrix)
        _, s, vh = torch.linalg.svd(chol.T @ w, full_matrices=False)
        r_eff = min(rank, vh.shape[0])
        v_r = vh[:r_eff].T  # [out, r]
        trunk[e] = (w @ v_r).float()
        head = v_r.T * scale  # back to the targets' own scale
        head_w[e] = head.float()
        head_b[e] = (y_mean - x_mean @ (w @ v_r) @ head).float()
        if progress:
            progress(f"exit layer {e}: rank {r_eff} fitted", (i + 1) / len(exit_layers))
    ghost = GhostKV(list(exit_layers), L, H, kvh, hd, r_eff, eps, trunk, head_w, head_b)
    ghost.meta["train_tokens"] = len(data)
    return ghost


@torch.no_grad()
def reconstruction_error(bundle: Any, ghost: GhostKV | None, data: ExitData, exit_layer: int
                         ) -> dict[int, dict[str, float]]:
    """Per skipped layer (0-based): cosine and relative L2 error of K and V against the true K/V, for Ghost KV
    (None: propagation only) and for propagation, on `data`."""
    L = int(bundle.model.config.num_hidden_layers)
    out: dict[int, dict[str, float]] = {}
    pred = ghost.predict(exit_layer, data.hidden[exit_layer].float()) if ghost is not None else None
    for n, j in enumerate(range(exit_layer, L)):
        tk, tv = true_kv(bundle, data, j)
        pk, pv = propagated_kv(bundle, data, exit_layer, j)
        row: dict[str, float] = {}
        cands = {"propagate": (pk, pv)}
        if ghost is not None:
            cands["ghost"] = (pk, pv) if j == exit_layer else (pred[0][:, n - 1], pred[1][:, n - 1])
        for name, (k, v) in cands.items():
            for kind, p, t in (("k", k, tk), ("v", v, tv)):
                row[f"{name}_{kind}_cos"] = round(float(torch.nn.functional.cosine_similarity(p, t, dim=-1).mean()), 4)
                row[f"{name}_{kind}_rel_l2"] = round(float((p - t).norm() / t.norm().clamp_min(1e-12)), 4)
        out[j] = row
    return out


def train_ghost_kv(bundle: Any, data: ExitData, exit_layers: list[int], *, rank: int = 128,
                   progress: Progress | None = None) -> tuple[GhostKV, dict[str, Any]]:
    """Fit on the training split; report held-out cosine and relative L2 per exit layer (mean over its skipped
    layers), for Ghost KV and for propagation."""
    if rank < 1:
        raise ConfigError(f"the Ghost KV rank is {rank}; it must be at least 1 (e.g. 128)")
    train, test = split_by_prompt(data)
    fit_share = 0.8  # of the progress bar; the held-out evaluation takes the rest
    ghost = fit_ghost_kv(bundle, train, exit_layers, rank=rank,
                         progress=(lambda m, f: progress(m, f * fit_share)) if progress else None)
    report: dict[str, Any] = {"train_tokens": len(train), "held_out_tokens": len(test), "rank": ghost.rank,
                              "parameters": ghost.num_parameters(), "held_out": {}}
    for i, e in enumerate(exit_layers):
        err = reconstruction_error(bundle, ghost, test, e)
        mean = lambda key: round(sum(r[key] for r in err.values()) / len(err), 4)  # noqa: E731
        report["held_out"][str(e)] = {k: mean(k) for k in next(iter(err.values()))}
        if progress:
            done = fit_share + (1 - fit_share) * (i + 1) / len(exit_layers)
            progress(f"exit layer {e}: held-out error measured", done)
    ghost.meta.update(report)
    return ghost, report


def ghost_exit_layers(bundle: Any) -> list[int]:
    """The exit layers to train a Ghost KV for: those of the model's exit heads (the engine predicts K/V only at
    an exit, so a Ghost KV without exit heads would never run)."""
    directory = find_profile(bundle.fingerprint)
    if directory is None:
        raise ProfileError(f"no exit heads for {bundle.name}; Ghost KV is trained for their exit layers, so run "
                           "`sedac-chat train` first")
    return ExitHeads.load(directory, hidden_size=int(bundle.model.config.hidden_size)).layers


def held_out_summary(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per fill (ghost, propagate): the held-out K/V cosine and relative L2, averaged over the exit layers."""
    rows = list(report["held_out"].values())
    out: dict[str, dict[str, float]] = {}
    for fill in ("ghost", "propagate"):
        keys = [k for k in rows[0] if k.startswith(fill + "_")] if rows else []
        out[fill] = {k[len(fill) + 1:]: round(sum(r[k] for r in rows) / len(rows), 4) for k in keys}
    return out
