"""The Flower runtime: the same Strategy, trainers and rounds as the embedded runtime, over a real
Flower federation (one SuperLink, one SuperNode per client) with Flower's Message API.

Plumbing, which knows nothing of the modes: ``records`` (tensors, payloads, updates and test
replies to and from Flower records), ``state`` (a client's id, its state on disk, the process
cache), ``nodes`` (which node holds which client; exchanges that survive restarts; setup),
``runtime`` (the clients as the rounds see them; opening a run on the ServerApp), ``deploy``
(``fellrec flower up`` / ``run``). Modes, built on the plumbing: ``plain``, ``split`` (flexible
storage), ``fedpa``. The app files in ``app/`` pick the mode. Messages and state: docs/FLOWER.md.
"""
