"""FedPA's server (Zhang et al., IJCAI 2024; research/fedpa.md §3.2): one private user per client,
a shared adaptive gate and output layer, and one adapter per value of each group attribute.

Server state: the global tensors (``gate.*``, ``out.*``) and, for every group attribute ``attr``
and value ``v``, the group adapter under ``group.{attr}={v}.{layer}.{A|B}``. A client sees its own
group adapters under value-free names (``group.{attr}.{layer}.{A|B}``); ``client_groups`` says
which value of each group attribute every client has.

Each round:

- a client receives the global tensors and its groups' adapters (``share``: send them back);
- global tensors become the mean over the round's participants;
- the adapter of group value v becomes the mean over the participants having that value only;
  a value with no participant keeps its previous adapter;
- the user-level adapter and the user-attribute embeddings never leave the client (an update
  carrying any tensor the client was not sent is refused).

``weighting``: ``samples`` (default) weights each client by its number of training samples;
``uniform`` takes the plain mean, as the released code does. ``ldp_scale`` > 0 asks clients to add
Laplace(0, ldp_scale) noise to every uploaded tensor (the client does it before sending, so the
server never sees the clean tensors); it travels in ``Payload.config["ldp_scale"]``.

The baselines need no strategy of their own: FedAvg of one shared adapter and FedAvg of the whole
model are ``fellrec.strategies.fedavg.FedAvg`` over the tensors the client trainer shares, and
local fine-tuning is ``fellrec.strategies.local.Local`` (see ``fellrec.fedpa.trainer``).
"""

from __future__ import annotations

from typing import Any

import torch

from fellrec.strategies.base import ClientUpdate, Payload, Strategy, Tensors

GROUP = "group."


def server_group_key(client_key: str, value: int | str) -> str:
    """``group.{attr}.{rest}`` (the client's name) → ``group.{attr}={value}.{rest}`` (the server's)."""
    _, attr, rest = client_key.split(".", 2)
    return f"{GROUP}{attr}={value}.{rest}"


def parse_server_key(key: str) -> tuple[str, str, str]:
    """``group.{attr}={value}.{rest}`` → (attr, value, rest)."""
    _, head, rest = key.split(".", 2)
    attr, value = head.split("=", 1)
    return attr, value, rest


def mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_i t_i / Σ w_i, summed in float64 (order-independent), in the tensors' dtype."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    stacked = torch.stack([t.to(torch.float64) for t in tensors])
    return torch.tensordot(w, stacked, dims=1).to(tensors[0].dtype)


class FedPA(Strategy):
    name = "fedpa"

    def __init__(self, initial: Tensors, clients: list[str], client_groups: dict[str, dict[str, Any]] | None = None,
                 weighting: str = "samples", ldp_scale: float = 0.0, **options: Any):
        super().__init__(initial, clients)
        if weighting not in ("samples", "uniform"):
            raise ValueError(f"weighting must be 'samples' or 'uniform', got {weighting!r}")
        if ldp_scale < 0:
            raise ValueError(f"ldp_scale must be non-negative, got {ldp_scale}")
        self.weighting, self.ldp_scale = weighting, float(ldp_scale)
        self.server = {k: v.clone() for k, v in initial.items()}
        self.global_keys = [k for k in self.server if not k.startswith(GROUP)]
        by_attr: dict[str, dict[str, list[str]]] = {}
        for k in self.server:
            if k.startswith(GROUP):
                attr, value, rest = parse_server_key(k)
                by_attr.setdefault(attr, {}).setdefault(value, []).append(rest)
        self.attrs = sorted(by_attr)
        self.group_keys = {(a, v): [(f"{GROUP}{a}={v}.{rest}", f"{GROUP}{a}.{rest}") for rest in rests]
                           for a, vals in by_attr.items() for v, rests in vals.items()}
        self.values = {a: sorted(v) for a, v in by_attr.items()}
        self.client_groups = {c: {a: str(v) for a, v in g.items()} for c, g in (client_groups or {}).items()}
        for client in self.clients:
            mine = self.client_groups.get(client, {})
            for attr in self.attrs:
                if attr not in mine:
                    raise ValueError(f"client {client} has no value for group attribute {attr!r}")
                if mine[attr] not in by_attr[attr]:
                    raise ValueError(f"client {client}: group {attr}={mine[attr]} has no adapter on the server")

    def client_tensors(self, client: str) -> Tensors:
        """What ``client`` works with: the global tensors and its groups' adapters (value-free names)."""
        out = {k: self.server[k] for k in self.global_keys}
        for attr, value in self.client_groups.get(client, {}).items():
            for server_key, client_key in self.group_keys.get((attr, value), []):
                out[client_key] = self.server[server_key]
        return out

    def configure_fit(self, rnd: int, client: str) -> Payload:
        return Payload(self.client_tensors(client), {"share": True, "ldp_scale": self.ldp_scale})

    def configure_evaluate(self, client: str) -> Payload:
        return Payload(self.client_tensors(client))

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> dict[str, Any]:
        buckets: dict[str, tuple[list[torch.Tensor], list[float]]] = {}
        counts: dict[str, int] = {}
        for u in updates:
            expected = self.client_tensors(u.client).keys()
            extra = sorted(set(u.tensors) - set(expected))
            if extra:
                raise ValueError(f"client {u.client} uploaded tensors it was not sent (private?): {extra[:3]}")
            weight = float(u.num_examples) if self.weighting == "samples" else 1.0
            groups = self.client_groups.get(u.client, {})
            for k, t in u.tensors.items():
                if k.startswith(GROUP):
                    attr = k.split(".", 2)[1]
                    key = server_group_key(k, groups[attr])
                else:
                    key = k
                ts, ws = buckets.setdefault(key, ([], []))
                ts.append(t)
                ws.append(weight)
            for attr, value in groups.items():
                name = f"{attr}={value}"
                counts[name] = counts.get(name, 0) + 1
        for key, (ts, ws) in buckets.items():
            if sum(ws) > 0:
                self.server[key] = mean(ts, ws)
        return {"weights": {u.client: u.num_examples for u in updates}, "group_participants": counts}

    def global_tensors(self) -> Tensors:
        return self.server

    def state(self) -> Tensors:
        return dict(self.server)

    def load_state(self, tensors: Tensors) -> None:
        if tensors.keys() != self.server.keys():
            raise ValueError("checkpoint's FedPA server state does not match this model's shared tensors")
        self.server = dict(tensors)
