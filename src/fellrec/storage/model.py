"""``SplitLM``: a LoRA LM run in split mode, looking to the backbones like the whole model.

The backbones (ranker, BIGRec) and the client trainer reach the model only through
``fellrec.backbones.text`` (``decoder``, ``lm_head``), ``fellrec.adapters`` (the trainable tensors)
and ``disable_adapter``. ``SplitLM`` answers each of these with the client's part, and runs the
trunk through the transport: so the same training loop trains a split model.

Which client is active is set by ``use_client``; the server keeps that client's trunk adapter. The
adapter this model hands out and takes in (``adapter_parameters``) is the client's part only; the
trunk's part is reached through ``trunk_adapter`` / ``set_trunk_adapter`` (what the server holds).
The trunk's optimizer runs on the server: ``reset_trunk_optimizer`` at the start of a client's
local training, ``step_trunk`` after each local step (with the factor that clips the whole
adapter's gradient, computed from ``trunk_sq_norm`` and the client's own).

``generate`` runs BIGRec's beam search split: the client keeps its blocks' key/value cache, the
server keeps the trunk's per session (``fellrec.storage.generate``).

``ClientSplitLM`` is the client's half alone, for a trunk in another process or machine: it holds
no trunk block (``SplitLM.client_half`` drops them), its ``transport`` reaches the server, and the
trunk adapter, its optimizer and its steps are the server's business (``trunk_names`` is empty: the
adapter it hands out and takes in is the client's part, in and out).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fellrec.storage.decoder import SplitDecoder
from fellrec.storage.parts import ClientPart, adapters_off, cut, trainable
from fellrec.storage.transport import InProcessTransport, Message, Transport
from fellrec.storage.trunk import TrunkServer


class _SplitModel(nn.Module):
    """What the backbones see of a cut model, whole (``SplitLM``) or the client's half
    (``ClientSplitLM``): the client's part, its decoder, and the calls that reach the trunk."""

    fellrec_split = True  # how text.decoder, text.lm_head and adapters.adapter_parameters recognise it

    def __init__(self, client: ClientPart, k: int, tail: int):
        super().__init__()
        self.client = client  # the only registered submodule: parameters() are the client's
        self.k, self.tail = k, tail

    def use_client(self, client: str) -> None:
        self.decoder.client = client

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        return trainable(self.client)

    def trunk_sq_norm(self) -> torch.Tensor:
        """Σ ||grad||² of the trunk adapter in this step (the last backward reply's; 0 before any)."""
        norm = self.decoder.trunk_sq_norm
        return torch.zeros((), dtype=torch.float64) if norm is None else norm

    def trunk_prox(self) -> torch.Tensor:
        """FedProx's term of the trunk adapter, μ/2·||w − w_start||², as the last training forward's
        reply gave it (0 without FedProx): the server adds its gradient, this is only its value."""
        prox = self.decoder.trunk_prox
        return torch.zeros(()) if prox is None else prox.to(torch.float32)

    def step_trunk(self, scale: torch.Tensor | None = None) -> None:
        self.decoder.step(scale)

    def generate(self, input_ids, attention_mask, *, num_beams: int = 4, max_new_tokens: int = 32,
                 eos_token_id: int, pad_token_id: int | None = None, do_sample: bool = False):
        """Beam search in split mode (``fellrec.storage.generate``), returned as transformers'
        ``generate`` does: the prompt followed by the new tokens, padded with ``pad_token_id``."""
        from fellrec.storage.generate import beam_search, split_model_step

        if do_sample:
            raise ValueError("split-mode generation is beam search only (do_sample=False)")
        step, release = split_model_step(self)
        try:
            new = beam_search(step, input_ids, attention_mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
                              eos_token_id=eos_token_id)
        finally:
            release()
        width = max((len(x) for x in new), default=0)
        pad = pad_token_id if pad_token_id is not None else eos_token_id
        tail = torch.full((len(new), width), pad, dtype=input_ids.dtype)
        for i, x in enumerate(new):
            tail[i, :len(x)] = torch.tensor(x, dtype=input_ids.dtype)
        return torch.cat([input_ids, tail], dim=1)


class SplitLM(_SplitModel):
    def __init__(self, model: nn.Module, k: int, tail: int = 1):
        client, trunk = cut(model, k, tail)
        super().__init__(client, k, tail)
        self._whole = [model]  # kept out of the module tree; for disable_adapter in this process
        self.server = TrunkServer(trunk)
        self.transport = InProcessTransport(self.server)
        self.decoder = SplitDecoder(client, self.transport, client="")

    # ---- what the backbones and fellrec.adapters use ---------------------------------------------

    def trunk_names(self) -> list[str]:
        return list(trainable(self.server.trunk))

    def trunk_adapter(self) -> dict[str, torch.Tensor]:
        return self.server.adapter(self.decoder.client)

    def set_trunk_adapter(self, tensors: dict[str, torch.Tensor]) -> None:
        self.server.set_adapter(self.decoder.client, tensors)

    def reset_trunk_optimizer(self, make: Callable | None, prox_mu: float = 0.0) -> None:
        self.server.reset_optimizer(self.decoder.client, make, prox_mu)

    def disable_adapter(self):
        """Adapters off on every part (in this process the parts share the whole model's layers)."""
        return self._whole[0].disable_adapter()

    def train(self, mode: bool = True):
        super().train(mode)
        self.server.trunk.train(mode)
        return self

    def client_half(self, transport: Transport) -> ClientSplitLM:
        """The client's part alone, talking to the trunk through ``transport``. The trunk blocks are
        taken out of the whole model, so once this ``SplitLM`` is dropped, no trunk weight is left in
        this process."""
        inner = self._whole[0].get_base_model() if hasattr(self._whole[0], "get_base_model") else self._whole[0]
        for i in self.server.trunk.block_indices():
            inner.model.layers[i] = nn.Identity()
        half = ClientSplitLM(self.client, transport, self.k, self.tail)
        half.train(self.training)
        self.server = self._whole = self.transport = self.decoder.transport = None
        return half


class ClientSplitLM(_SplitModel):
    """The client's part of a split model whose trunk runs elsewhere, behind ``transport``.

    ``transport`` may be replaced between calls (the Flower client gives it a new one for every
    message). While ``disable_adapter`` is on, forward and decode requests carry ``adapter = 0`` so
    that the server runs its trunk without the adapter too.
    """

    def __init__(self, client: ClientPart, transport: Transport, k: int, tail: int):
        super().__init__(client, k, tail)
        self.transport = transport
        self.decoder = SplitDecoder(client, _Flagged(self), client="")
        self.adapter_on = True

    def new_exchange(self, transport: Transport) -> None:
        """Talk to the trunk through ``transport`` from now on, numbering requests from 0 again (a
        Flower message's pass starts its exchange from the start)."""
        self.transport = transport
        self.decoder.restart()

    def trunk_names(self) -> list[str]:
        return []

    def trunk_adapter(self) -> dict[str, torch.Tensor]:
        return {}

    def set_trunk_adapter(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise ValueError("the trunk adapter is the server's: this client holds no trunk")

    def reset_trunk_optimizer(self, make: Callable | None, prox_mu: float = 0.0) -> None:
        """Nothing here: the server resets the trunk's optimizer (and FedProx's anchor) when the client's
        training begins."""

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        with adapters_off(self.client):
            self.adapter_on = False
            try:
                yield
            finally:
                self.adapter_on = True


class _Flagged:
    """The transport as the decoder sees it: ``adapter = 0`` added to requests while the adapter is off."""

    def __init__(self, model: ClientSplitLM):
        self.model = model

    def send(self, message: Message) -> Message:
        if not self.model.adapter_on and message.kind in ("forward", "decode"):
            message = Message(message.kind, message.client, message.request,
                              {**message.tensors, "adapter": torch.tensor(0)})
        return self.model.transport.send(message)
