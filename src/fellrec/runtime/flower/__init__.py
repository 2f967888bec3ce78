"""The Flower runtime: the same Strategy and AdapterTrainer as the embedded runtime, over a real
Flower federation (one SuperLink, one SuperNode per client), with Flower's Message API.

- ``server``: the ServerApp's main loop. ``FlowerRuntime`` is the embedded runtime with the two
  calls that reach the clients replaced by Flower messages, so rounds, sampling, aggregation,
  logging and checkpoints are the embedded runtime's own code. ``Nodes`` maps fellrec's client ids
  (each SuperNode's ``--node-config client-id=N``) to Flower node ids, which change when a
  SuperNode restarts, and re-sends a message whose node went away.
- ``client``: the ClientApp's handlers. A SuperNode builds its client's ``AdapterTrainer`` from the
  run's config (it travels in the run config) and keeps its private state (adapter, best round) on
  its own disk, keyed by run and client id, so it survives a restart of the SuperNode.
- ``records``: tensors, payloads and updates to and from Flower records.
- ``split``: split mode: the trunk on the ServerApp, the clients' head and tail on the SuperNodes.
- ``deploy``: start a local deployment (``fellrec flower up``), submit a run and judge it by the
  status the SuperLink recorded (``fellrec flower run``).
- ``app/``: the Flower app directory (``pyproject.toml`` and two thin modules) that ``flwr run``
  packages; it imports everything else from the installed fellrec.

Message types: ``query`` (setup: sample counts, initial adapter), ``query.whoami`` (client id
only, cheap), ``train`` (local training), ``evaluate`` (validation), ``evaluate.test`` (the test
with the selected adapter). Split mode (flexible storage, ``storage.k``; see ``split``) adds
``query.split`` (setup: what the server computed from the frozen base model) and continues each
exchange with ``train.split``, ``evaluate.split`` and ``evaluate.test_split`` messages that carry
the trunk's replies one way and the client's trunk requests the other.
"""
