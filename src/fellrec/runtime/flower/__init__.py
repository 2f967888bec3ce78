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
- ``deploy``: start a local deployment (``fellrec flower up``), submit a run and judge it by the
  status the SuperLink recorded (``fellrec flower run``).
- ``app/``: the Flower app directory (``pyproject.toml`` and two thin modules) that ``flwr run``
  packages; it imports everything else from the installed fellrec.

Message types: ``query`` (setup: sample counts, initial adapter), ``query.whoami`` (client id
only, cheap), ``train`` (local training), ``evaluate`` (validation), ``evaluate.test`` (the test
with the selected adapter), ``train.split_*`` (flexible storage, see ``split``).
"""
