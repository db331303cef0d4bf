"""EscardaLM: assembles the enabled plugins of every slot into a pre-norm decoder.

    x = embed(ids) (+ embedding plugins)
    S = residual.expand(x)
    per block:  S = residual.sublayer(S, attn∘norm)   S = residual.sublayer(S, ffn∘norm)
    h = refine(residual.collapse(S));  logits = head(norm(h)), computed only when asked for:
    losses go through the fused head (chunked linear + cross-entropy, never the [B, T, V] logits)

Branching lives here (which plugin fills which slot); the math lives in the plugins.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from escarda_lab import config, registry
from escarda_lab.layers import RMSNorm, Rope, linear_nll_and_logsumexp, nll_and_logsumexp


@dataclass
class ModelOutput:
    _logits: Tensor | None  # [B, T, V], or None: computed on first use of `.logits`
    hidden: Tensor  # [B, T, D] final hidden state, before the final norm
    aux_losses: dict[str, tuple[Tensor, float]] = field(default_factory=dict)  # name -> (term, weight)
    cache: "Cache | None" = None
    lm: "LMHandle | None" = field(default=None, repr=False)  # what objectives may use of the model
    _nll_lse: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)

    @property
    def logits(self) -> Tensor:
        """[B, T, V]. Training never asks for them: its losses go through `nll_lse`."""
        if self._logits is None:
            self._logits = self.lm.logits(self.hidden)
        return self._logits

    def nll_lse(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position NLL and logsumexp of the logits ([B, T] each; NLL is 0 where label = -100).

        Computed once per output and shared by every objective that needs them (CE, z-loss); by
        the fused head (no [B, T, V] logits) unless the logits were already asked for.
        """
        if self._nll_lse is None or self._nll_lse[0] is not labels:
            if self._logits is not None or self.lm is None:
                sums = nll_and_logsumexp(self.logits, labels)
            else:
                sums = self.lm.head_nll_lse(self.hidden, labels)
            self._nll_lse = (labels, *sums)
        return self._nll_lse[1], self._nll_lse[2]


class Cache:
    """Decoding state: the position reached and one state dict per stateful module."""

    def __init__(self, max_len: int):
        self.pos = 0
        self.max_len = max_len
        self._states: dict[int, dict[str, Any]] = {}

    def state(self, module: nn.Module) -> dict[str, Any]:
        return self._states.setdefault(id(module), {})

    def numbers_per_token(self) -> float:
        """Numbers cached per token, all layers together: the per-position buffers, preallocated
        to max_len along dim -2 (fixed-size states such as n-gram tails excluded)."""
        total = 0.0
        for state in self._states.values():
            for t in state.values():
                if isinstance(t, Tensor) and t.dim() >= 3 and t.shape[-2] == self.max_len:
                    total += t.numel() / (t.shape[0] * self.max_len)
        return total


@torch.no_grad()
def cache_numbers_per_token(model: "EscardaLM") -> float:
    """Numbers the decoding cache holds per token for any config (one cached one-token forward)."""
    cache = model.new_cache()
    model(torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device), cache=cache)
    return cache.numbers_per_token()


def cache_bytes_per_token(model: "EscardaLM", dtype: torch.dtype = torch.float32) -> float:
    """KV-cache bytes one token costs, with the cache kept in `dtype`."""
    return cache_numbers_per_token(model) * torch.tensor([], dtype=dtype).element_size()


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, name), the same in every process (unlike Python's hash)."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def seeded(seed: int, name: str):
    """Within the block the global torch RNG is seeded by (seed, name); restored on exit."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(name_seed(seed, name))
        yield


class Block(nn.Module):
    def __init__(self, m, comps, layer: int):
        """comps: the components config (None: the slot baselines only)."""
        super().__init__()
        ((att, att_cfg),) = registry.enabled("attention", comps) if comps is not None else [baseline("attention")]
        ((ffn, ffn_cfg),) = registry.enabled("ffn", comps) if comps is not None else [baseline("ffn")]
        mods = registry.enabled("attention_modifier", comps) if comps is not None else []
        self.attn_norm = RMSNorm(m.d_model, m.norm_eps)
        self.attn = att.build(m, att_cfg, layer=layer, modifiers=[e.build(m, c) for e, c in mods])
        self.ffn_norm = RMSNorm(m.d_model, m.norm_eps)
        self.ffn = ffn.build(m, ffn_cfg, layer=layer)
        self.ffn_needs_ids = getattr(self.ffn, "needs_ids", False)  # e.g. MoE routed by token-id hash
        self.layer = layer

    def forward(self, S, residual, rotary, cache: Cache | None, ids: Tensor | None = None):
        S = residual.sublayer(S, lambda x: self.attn(self.attn_norm(x), rotary, cache), 2 * self.layer)
        kw = {"ids": ids} if self.ffn_needs_ids else {}
        return residual.sublayer(S, lambda x: self.ffn(self.ffn_norm(x), **kw), 2 * self.layer + 1)


def own_stats(stats: dict[str, float], name: str) -> dict[str, float]:
    """The `<name>/<stat>` entries of `stats`, keyed by `<stat>`."""
    return {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith(name + "/")}


def baseline(slot: str) -> tuple[registry.Entry, registry.ComponentConfig]:
    return registry.baseline(slot), registry.ComponentConfig(enabled=True)


class LMHandle:
    """What an objective may use of the model, and nothing else (not a module: owns no weights)."""

    def __init__(self, model: "EscardaLM"):
        self._model = model

    def embed(self, ids: Tensor) -> Tensor:
        return self._model.embed(ids)

    def logits(self, h: Tensor) -> Tensor:
        """The output head on hidden states h [.., D]: final norm, then the (tied) projection."""
        return self._model.logits(h)

    def nll_lse(self, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position (NLL, logsumexp) of `logits(h)` against labels, through the fused head:
        the [.., V] logits are never materialised (an auxiliary head trained by its NLL alone)."""
        return self._model.head_nll_lse(h, labels, zeta=0.0)

    def head_nll_lse(self, h: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The same for the main head, its gradient prepared for cross-entropy and z-loss."""
        return self._model.head_nll_lse(h, labels)

    def rotary(self, pos: int, T: int):
        return self._model.rope.at(pos, T)

    def baseline_block(self, layer: int = 0) -> "Block":
        """A new block of the slot baselines (attention and FFN) at the model's shape."""
        return Block(self._model.cfg, None, layer)

    def plain_residual(self) -> nn.Module:
        entry, cfg = baseline("residual")
        return entry.build(self._model.cfg, cfg, n_sites=0)


class EscardaLM(nn.Module):
    def __init__(self, cfg):
        """cfg: the full config object (uses cfg.model and cfg.components)."""
        super().__init__()
        m, comps = cfg.model, cfg.components
        if m.vocab_size is None:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building")
        self.cfg = m
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        # Keyed by plugin name (not position), so a plugin's parameter names, and with them its
        # initial values, do not depend on which other embedding plugins are on.
        ((res, res_cfg),) = registry.enabled("residual", comps)
        residual = res.build(m, res_cfg, n_sites=2 * m.n_layers)
        streams = residual.streams
        self.embedders = nn.ModuleDict(
            {e.name: e.build(m, c, streams=streams) for e, c in registry.enabled("embedding", comps)}
        )
        self.residual = residual
        self.blocks = nn.ModuleList(Block(m, comps, i) for i in range(m.n_layers))
        refine = registry.enabled("refine", comps)
        self.refine = refine[0][0].build(m, refine[0][1]) if refine else None
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.head.weight = self.embed.weight
        self.rope = Rope(m.rope_dim, m.max_seq_len, m.rope_theta, m.rope_style)
        # Objectives may own parameters (JEPA predictor, MTP heads): they live in the model.
        self.objectives = nn.ModuleDict(
            {e.name: e.build(m, c, lm=LMHandle(self)) for e, c in registry.enabled("objective", comps)}
        )
        terms = [(o.weight * c, k) for o in self.objectives.values() for k, c in o.head_terms.items()]
        nll = sum(c for c, k in terms if k == "nll")
        self.zeta = sum(c for c, k in terms if k == "lse_sq") / nll if nll else 0.0
        self.fused_head = cfg.train.fused_head
        self.init_seed = config.seeds(cfg)[0]
        self.reset_parameters()
        self._plugins = tuple(self.plugin_modules())

    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix; then each plugin's own `init_weights()`.

        Common random numbers: each module draws from a generator seeded by (init seed, its
        qualified name), so a weight's initial value never depends on which other modules exist
        or on what drew random numbers before the model was built. Two variants of one seed
        then share every weight they have in common, and their difference is the change alone.
        """
        named = list(self.named_modules())
        for name, mod in named:
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                with seeded(self.init_seed, name):
                    nn.init.normal_(mod.weight, std=self.cfg.init_std)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        for name, mod in named:  # after the matrices: a plugin may re-initialise its children
            if isinstance(mod, registry.Plugin):
                with seeded(self.init_seed, name + "#init_weights"):
                    mod.init_weights()

    def logits(self, h: Tensor) -> Tensor:
        """The output head on hidden states h [.., D] (final norm, then the tied projection)."""
        return self.head(self.norm(h))

    def head_nll_lse(self, h: Tensor, labels: Tensor, zeta: float | None = None) -> tuple[Tensor, Tensor]:
        """(NLL, logsumexp) of `logits(h)` per position, by the chunked fused head. ζ: the ratio
        of the objectives' weights on Σ lse² and Σ NLL the gradient is prepared for (default:
        this model's, from its objectives' `head_terms`)."""
        if not self.fused_head:
            return nll_and_logsumexp(self.logits(h), labels)
        zeta = self.zeta if zeta is None else zeta
        return linear_nll_and_logsumexp(self.norm(h), self.head.weight, labels, zeta)

    def new_cache(self) -> Cache:
        return Cache(self.cfg.max_seq_len)

    def forward(self, ids: Tensor, cache: Cache | None = None) -> ModelOutput:
        """ids: [B, T] -> ModelOutput. With a cache, ids continue the cached sequence."""
        T = ids.shape[1]
        pos = cache.pos if cache is not None else 0
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(ids)
        for e in self.embedders.values():
            x = e(ids, x, cache)
        rotary = self.rope.at(pos, T)
        S = self.residual.expand(x)
        for block in self.blocks:
            for e in self.embedders.values():
                S = e.before_block(ids, S, self.residual, block.layer, cache)
            S = block(S, self.residual, rotary, cache, ids)
        h = self.residual.collapse(S)
        if self.refine is not None:
            h = self.refine(h)
        if cache is not None:
            cache.pos += T
        return ModelOutput(None, h, self.aux_losses(), cache=cache, lm=LMHandle(self))

    def plugin_modules(self) -> list[tuple[str, registry.Plugin]]:
        """(component name, module) for every plugin instance in the model."""
        return [(m.component_name, m) for m in self.modules() if isinstance(m, registry.Plugin)]

    def aux_losses(self) -> dict[str, tuple[Tensor, float]]:
        """Losses plugins left during forward (`self.aux_loss = (term, weight)`), summed by name."""
        out: dict[str, tuple[Tensor, float]] = {}
        for name, mod in self._plugins:
            aux = mod.aux_loss
            if aux is not None:
                term, weight = aux
                out[name] = (out[name][0] + term, weight) if name in out else (term, weight)
        return out

    def health(self, final: dict[str, float], peak: dict[str, float]) -> dict[str, str]:
        """{component: why it looks dead} from each plugin's `health(final, peak)` check.

        final: the last `stats()`; peak: the largest |value| each stat reached during the run.
        """
        flags: dict[str, str] = {}
        for name, mod in self._plugins:
            if name in flags:
                continue
            reason = mod.health(own_stats(final, name), own_stats(peak, name))
            if reason:
                flags[name] = reason
        return flags

    @torch.no_grad()
    def collect_stats(self, ids: Tensor) -> dict[str, float]:
        """`stats()` after a training forward of `ids`. A compiled forward keeps nothing for them
        (`probing` is off inside a graph), so a compiled model first runs `ids` once more, eagerly
        and without gradients: statistics, and the dead-component check, do not vanish on a GPU."""
        if getattr(self, "_compiled_call_impl", None) is not None:
            self.forward(ids)
        return self.stats()

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        """Health signals of every plugin, `<component>/<stat>`, averaged over its instances."""
        acc: dict[str, list[float]] = {}
        for name, mod in self._plugins:
            for k, v in mod.stats().items():
                acc.setdefault(f"{name}/{k}", []).append(float(v))
        return {k: sum(v) / len(v) for k, v in acc.items()}
