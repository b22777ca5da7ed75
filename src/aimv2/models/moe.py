"""A mixture-of-experts SwiGLU: the routing and load-balancing loss of Apple's AIMv2-MoE (ml-l3m's
``configs/aimv2/002_aimv2_moe_hfdata.yaml``, which runs megablocks' dropless ``dMoE``).

    x [B, N, D] -> tokens [T = B*N, D]
      -> router: Linear(D, E, no bias) -> softmax over the E experts       probs [T, E]
      -> top-k of probs (weights NOT renormalised: top-1 scales by p_max)  weights, experts [T, k]
      -> each token through its k experts, SwiGLU fc2(silu(fc1 x) * fc3 x), weighted and summed
    -> [B, N, D]

Dropless: every token reaches its experts whatever the load (no capacity, no dropped tokens), so a token's output
depends on that token alone, as with the dense SwiGLU: causality and the prefix pattern are untouched.

Load balancing (megablocks' ``batched_load_balancing_loss``, the Switch Transformer's loss averaged over layers):

    balance = mean over MoE layers of E * sum_e f_e * P_e,
        f_e = tokens routed to e / (T * k),  P_e = mean_t probs[t, e]

which is 1 when routing is uniform. The objective adds ``weight * balance`` (l3m: 0.01) to the loss.

Init (l3m's): experts normal(0, 0.02) (megablocks' ``init_method``); the router is a Linear inside the trunk, so
the trunk's Xavier-uniform rule re-initialises it (``models.init.init_blocks_``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class MoEConfig:
    """``experts=0``: no MoE (the dense SwiGLU). l3m's AIMv2-MoE: 4 experts, top-1, balance weight 0.01."""

    experts: int = 0
    top_k: int = 1
    balance_weight: float = 0.01

    def __post_init__(self):
        if self.experts < 0 or (self.experts and not 1 <= self.top_k <= self.experts):
            raise ValueError(f"moe: need experts >= 0 and 1 <= top_k <= experts, got {self}")
        if self.balance_weight < 0:
            raise ValueError(f"moe.balance_weight must be >= 0, got {self.balance_weight}")

    @property
    def enabled(self) -> bool:
        return self.experts > 0

    def to_dict(self) -> dict:
        return asdict(self)


def moe_config(value: MoEConfig | dict | None) -> MoEConfig:
    """A config's ``moe`` entry (a mapping, as YAML gives it, or None) as an MoEConfig."""
    if value is None:
        return MoEConfig()
    if isinstance(value, MoEConfig):
        return value
    unknown = set(value) - set(asdict(MoEConfig()))
    if unknown:
        raise ValueError(f"unknown moe option(s) {sorted(unknown)}; valid: experts, top_k, balance_weight")
    return MoEConfig(**value)


class MoESwiGLU(nn.Module):
    """E SwiGLU experts behind a learned top-k router (see the module docstring). After each forward,
    ``balance`` holds this layer's E * sum_e f_e * P_e (a scalar with gradient through the router)."""

    def __init__(self, dim: int, hidden_dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.experts
        self.router = nn.Linear(dim, E, bias=False)
        self.fc1 = nn.Parameter(torch.empty(E, hidden_dim, dim))  # gate, per expert as a Linear's [out, in]
        self.fc3 = nn.Parameter(torch.empty(E, hidden_dim, dim))  # up
        self.fc2 = nn.Parameter(torch.empty(E, dim, hidden_dim))  # down
        self.balance: torch.Tensor | None = None
        self.static_routing = False  # see routes()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.router.weight)
        for w in (self.fc1, self.fc2, self.fc3):
            nn.init.normal_(w, std=0.02)

    def routes(self, chosen: torch.Tensor, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, their top-k slot) routed to expert ``e``. With ``static_routing`` (set by the dry run, which counts
        FLOPs on shape-only tensors where a data-dependent route has no size) pair j of the T*k goes to expert
        j mod E: the FLOPs of perfectly balanced routing."""
        if self.static_routing:
            j = torch.arange(e, chosen.numel(), self.cfg.experts, device=chosen.device)
            return j // self.cfg.top_k, j % self.cfg.top_k
        return (chosen == e).nonzero(as_tuple=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # [T, D]
        T, E, k = tokens.shape[0], self.cfg.experts, self.cfg.top_k
        probs = self.router(tokens).float().softmax(dim=-1)  # [T, E]
        weights, chosen = probs.topk(k, dim=-1)  # [T, k] each
        out = torch.zeros_like(tokens)
        for e in range(E):
            rows, slot = self.routes(chosen, e)  # the tokens that chose expert e, and in which of their k slots
            h = tokens[rows]  # [t_e, D]
            y = F.linear(F.silu(F.linear(h, self.fc1[e])) * F.linear(h, self.fc3[e]), self.fc2[e])  # [t_e, D]
            out = out.index_add(0, rows, y * weights[rows, slot, None].to(y.dtype))
        routed = probs.new_zeros(E).scatter_add(0, chosen.flatten(), probs.new_ones(T * k))  # [E] tokens per expert
        self.balance = E * torch.dot(routed / (T * k), probs.mean(dim=0))
        return out.reshape(shape)
