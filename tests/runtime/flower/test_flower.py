"""fellrec on Flower 1.41: the records, the client's state on disk, the ServerApp's message exchange,
and whole runs that must equal the embedded runtime's.

Here in process: the real ServerApp main loop and the real ClientApp, joined by a grid stand-in that
delivers each message to the ClientApp at once (and can make a node vanish). The same runs on real
Flower processes (a local deployment, the simulation engine) are in tests/runtime/flower/test_flower_deploy.py.
"""

import contextlib
import gc
import json
import os
import re
import sys
import threading
import time
import uuid
import weakref
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fellrec.config import dump, load_config
from fellrec.errors import ConfigError
from fellrec.run import run
from fellrec.runtime.flower import deploy
from fellrec.runtime.flower.nodes import ClientFailed, Nodes
from fellrec.runtime.flower.records import payload_content, read_payload, read_update, update_content
from fellrec.runtime.flower.state import ClientState, ProcessCache, client_id
from fellrec.strategies import ClientUpdate, Payload

sys.path.insert(0, str(deploy.APP_DIR))
from fellrec_flower.client_app import app as client_app
from fellrec_flower.server_app import serve as server_app

# LoRA dropout well above 0 and a large step: a validation or test that ran with dropout on (as a
# fresh ClientApp process once did) would change the metrics, so the comparisons below would see it
THREE = ["model.name_or_path=tiny-random", "partition.method=attribute", "partition.attribute=age",
         "partition.bins=[0,25,40,100]", "train.batch_size=4", "train.local_steps=2", "train.max_train_samples=48",
         "eval.max_valid_samples=8", "eval.max_test_samples=24", "train.rounds=2", "model.lora.dropout=0.3",
         "train.lr=0.05"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """Flower stamps a new message with the run and task of the process; here, a ServerApp's."""
    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, key, value)


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def close(a, b, path=""):
    """a and b equal, numbers to 1e-5 (relative) — times excepted."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            if k not in ("time_s", "train_time_s", "runtime"):
                close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float | int):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_same_run(flower_dir: Path, embedded_dir: Path, private: tuple[str, ...] = ()) -> None:
    """The same run: losses and validation of every round, each client's selected round and adapter,
    then the test metrics and the bytes (in this order, so a failure names its first cause). Adapter
    tensors named by a ``private`` prefix stay on the Flower clients (the embedded run writes them)."""
    close(lines(embedded_dir / "metrics.jsonl"), lines(flower_dir / "metrics.jsonl"), "metrics")
    res_e = json.loads((embedded_dir / "results.json").read_text())
    res_f = json.loads((flower_dir / "results.json").read_text())
    close(res_e["best_round"], res_f["best_round"], "best_round")
    names = sorted(p.name for p in (embedded_dir / "adapters").iterdir())
    assert names == sorted(p.name for p in (flower_dir / "adapters").iterdir())
    for name in names:
        a, b = load_file(embedded_dir / "adapters" / name), load_file(flower_dir / "adapters" / name)
        a = {k: v for k, v in a.items() if not (private and k.startswith(private))}
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")
    for key in ("clients", "overall", "imbalance", "intervals", "warnings", "communication", "samples",
                "client_names", "steps_per_round", "select_by", "algorithm", "rounds"):
        close(res_e[key], res_f[key], key)
    # the same users with the same per-user metrics (the rows grouped by client on Flower)
    rows_e, rows_f = ((d / "test_users.csv").read_text().splitlines() for d in (embedded_dir, flower_dir))
    assert rows_e[0] == rows_f[0] and sorted(rows_e[1:]) == sorted(rows_f[1:])


# ---- records and state --------------------------------------------------------------------------


def test_payloads_and_updates_survive_flower_records_bit_for_bit():
    tensors = {"base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 8),
               "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(8, 4)}
    msg = Message(payload_content(3, Payload(tensors, {"share": True, "prox_mu": 0.01})), dst_node_id=1,
                  message_type="train")
    rnd, payload = read_payload(msg)
    assert rnd == 3 and payload.config == {"share": True, "prox_mu": 0.01}
    assert all(torch.equal(payload.tensors[k], v) for k, v in tensors.items())
    content = update_content("2", ClientUpdate("2", tensors, 48, {"loss": 1.25, "steps": 2}))
    update = read_update("2", Message(content, dst_node_id=1, message_type="train"))
    assert update.num_examples == 48 and update.metrics == {"loss": 1.25, "steps": 2}
    assert isinstance(update.metrics["steps"], int)
    assert all(torch.equal(update.tensors[k], v) for k, v in tensors.items())


def test_client_state_reads_the_newest_state_before_a_phase_and_keeps_four(tmp_path):
    state = ClientState(tmp_path / "c")
    assert state.before(1, 0) is None
    for r in (1, 2, 3):
        for phase in (0, 1):
            state.save_phase(r, phase, {"w": torch.full((2,), 10.0 * r + phase)}, {"r": r, "phase": phase})
    assert state.saved() == [(2, 0), (2, 1), (3, 0), (3, 1)]  # the oldest are gone
    tensors, meta = state.before(3, 0)  # training round 3 starts from the validation of round 2
    assert meta == {"r": 2, "phase": 1} and torch.equal(tensors["w"], torch.full((2,), 21.0))
    assert state.before(3, 1)[1] == {"r": 3, "phase": 0}  # validating round 3: after its training
    assert state.before(9, 2)[1] == {"r": 3, "phase": 1} and state.before(2, 0) is None


def test_client_id_comes_from_the_node_config_never_the_node_id():
    def ctx(nc):
        return Context(run_id=1, node_id=987654, node_config=nc, state=RecordDict(), run_config={})

    assert client_id(ctx({"client-id": 2})) == "2"
    assert client_id(ctx({"partition-id": 1, "num-partitions": 3})) == "1"  # Flower's simulation
    with pytest.raises(ValueError, match="node config has no client-id"):
        client_id(ctx({}))


# ---- the ServerApp over a grid stand-in ---------------------------------------------------------


class LocalGrid:
    """Delivers every message to the real ClientApp in this process, as a SuperLink would route it.

    ``nodes`` maps a Flower node id to its node config; ``dead`` nodes answer NODE_UNAVAILABLE, as
    the SuperLink does for a node that stopped heart-beating; ``on_deliver`` may change the nodes.
    """

    def __init__(self, run_config, nodes, on_deliver=None):
        self.run_config, self.nodes, self.on_deliver = run_config, dict(nodes), on_deliver
        self.dead: set[int] = set()
        self.inbox: dict[str, Message] = {}
        self.delivered: list[tuple[str, int]] = []
        self.sent: list[tuple[str, set[str]]] = []
        self.replies: list[tuple[Message, RecordDict]] = []  # every request with its reply's content, whole

    def get_node_ids(self):
        return [n for n in self.nodes if n not in self.dead]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid = uuid.uuid4().hex
            m.metadata.__dict__["_message_id"] = mid
            self.inbox[mid] = m
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        out = []
        for mid in ids:
            m = self.inbox.pop(mid, None)
            if m is None:
                continue
            node = m.metadata.dst_node_id
            if node in self.dead:
                out.append(Message(Error(code=5, reason="node stopped heart-beating"), reply_to=m))
                continue
            self.delivered.append((m.metadata.message_type, node))
            ctx = Context(run_id=1, node_id=node, node_config=self.nodes[node], state=RecordDict(),
                          run_config=self.run_config)
            try:
                answer = client_app(m, ctx)
            except Exception as err:  # what a SuperNode reports when its ClientApp raised
                answer = Message(Error(code=2, reason=repr(err)), reply_to=m)
            if self.on_deliver:
                self.on_deliver(self, m)
            if node not in self.dead:  # a node that died while it worked never sends its reply
                out.append(answer)
                if answer.has_content():  # the names of the tensors each reply carried
                    self.replies.append((m, answer.content))
                    self.sent.append((m.metadata.message_type, {k for name, rec in answer.content.array_records.items()
                                                                for k in rec}))
        return out


def restart_client_1(message_type: str, state_dir):
    """An ``on_deliver`` hook: client 1's node dies while it handles its first ``message_type``
    message (after writing its state, before its reply leaves) and comes back as node 201."""

    def crash(grid, msg):
        if msg.metadata.message_type == message_type and grid.nodes[msg.metadata.dst_node_id]["client-id"] == 1 \
                and 201 not in grid.nodes:
            grid.dead.add(msg.metadata.dst_node_id)
            grid.nodes[201] = {"client-id": 1, "state-dir": str(state_dir)}

    return crash


def serve(cfg, run_dir, tmp_path, nodes=None, on_deliver=None, **run_config):
    rc = {"fellrec-config": dump(cfg), "run-dir": str(run_dir), "poll-s": 0.0, "round-timeout": 60.0,
          "wait-timeout": 5.0, "retries": 3, "collect-adapters": True, **run_config}
    nodes = nodes or {100 + i: {"client-id": i, "state-dir": str(tmp_path / f"state-{i}")} for i in range(3)}
    grid = LocalGrid(rc, nodes, on_deliver)
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    return grid


def embedded_runs(root: Path, algorithms=("fedavg", "fellrec")) -> dict[str, Path]:
    """The embedded runtime's runs that the Flower runs must reproduce, by algorithm."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FELLREC_CACHE", str(root / "cache"))
        for alg in algorithms:
            out[alg] = run(load_config(None, [*THREE, f"train.algorithm={alg}", f"name={alg}"]), root, progress=False)
    return out


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    return embedded_runs(tmp_path_factory.mktemp("embedded"),
                         ("fedavg", "fellrec", "ffa-lora", "fedsa-lora", "flora", "fedex-lora"))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "fellrec", "ffa-lora", "fedsa-lora", "flora", "fedex-lora"])
def test_server_and_client_apps_reproduce_the_embedded_run(tmp_path, embedded, algorithm):
    cfg = load_config(None, [*THREE, f"train.algorithm={algorithm}", f"name={algorithm}"])
    grid = serve(cfg, tmp_path / "run", tmp_path)
    assert_same_run(tmp_path / "run", embedded[algorithm])
    kinds = [k for k, _ in grid.delivered]  # round 1's validation went with round 2's training messages
    assert kinds.count("train") == 6 and kinds.count("evaluate") == 3 and kinds.count("evaluate.test") == 3
    # each client kept its own state, on its own disk
    for i in range(3):
        (folder,) = (tmp_path / f"state-{i}").iterdir()
        files = sorted(p.name for p in (folder / f"client-{i}").iterdir())
        assert files == ["adapter.safetensors", "data.pkl", "state-1-0.safetensors", "state-1-1.safetensors",
                         "state-2-0.safetensors", "state-2-1.safetensors"]
        kept = load_file(folder / f"client-{i}" / "adapter.safetensors")
        sent = load_file(tmp_path / "run" / "adapters" / f"client-{i}.safetensors")
        assert all(torch.equal(kept[k], sent[k]) for k in kept)


ITEMS = [*THREE, "model.backbone=item-tokens", "split.method=leave-one-out", "split.history_len=6",
         "split.train_stride=6", "model.lora.last_blocks=1", "train.lr=0.01"]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm, vectors", [("fedavg", "shared"), ("fellrec", "private")])
def test_the_item_token_backbone_over_flower_reproduces_the_embedded_run(tmp_path, algorithm, vectors):
    sets = [*ITEMS, f"train.algorithm={algorithm}", f"model.item_vectors={vectors}", "name=items"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FELLREC_CACHE", str(tmp_path / "embedded-cache"))
        expected = run(load_config(None, sets), tmp_path / "embedded", progress=False)
    grid = serve(load_config(None, sets), tmp_path / "run", tmp_path)
    private = ("items.x", "items.y", "items.bias")
    assert_same_run(tmp_path / "run", expected, private if vectors == "private" else ())
    trained = [names for kind, names in grid.sent if kind == "train"]
    assert trained and all("items.w_in" in names for names in trained)
    if vectors == "private":  # the per-item tensors never travelled, not even with the test's adapters
        assert not any(k.startswith(private) for _, names in grid.sent for k in names)
    else:
        assert all(any(k.startswith(private) for k in names) for names in trained)


@pytest.mark.slow
def test_a_client_whose_node_restarts_mid_round_gets_its_message_again(tmp_path, embedded):
    """Client 1's SuperNode dies after its first training message; it comes back as another node."""
    cfg = load_config(None, [*THREE, "train.algorithm=fedavg", "name=fedavg"])
    grid = serve(cfg, tmp_path / "run", tmp_path, on_deliver=restart_client_1("train", tmp_path / "state-1"))
    assert ("train", 201) in grid.delivered and ("query.whoami", 201) in grid.delivered
    assert json.loads((tmp_path / "run" / "results.json").read_text())["runtime"]["messages_resent"] >= 1
    assert_same_run(tmp_path / "run", embedded["fedavg"])


@pytest.mark.slow
def test_a_client_error_fails_the_run_with_the_clients_message(tmp_path):
    cfg = load_config(None, [*THREE, "train.algorithm=fedavg", "name=x", "train.rounds=1"])
    (tmp_path / "a-file").write_text("not a folder")
    nodes = {100 + i: {"client-id": i, "state-dir": str(tmp_path / f"s{i}")} for i in range(3)}
    nodes[102]["state-dir"] = str(tmp_path / "a-file")  # client 2 cannot keep its state there
    with pytest.raises(ClientFailed, match=r"query on client 2 \(node 102\) failed: .*NotADirectoryError"):
        serve(cfg, tmp_path / "run", tmp_path, nodes=nodes)


class ServerDied(Exception):
    pass


@pytest.mark.slow
def test_a_serverapp_that_dies_in_round_2_resumes_with_round_1s_validation_still_owed(tmp_path, embedded):
    """Round 1's validation travels with round 2's training messages, so round 1's line waits in the
    checkpoint. A ServerApp that dies once the clients have done that work (validated round 1, trained
    round 2, written their state) resumes, sends the messages again and ends as the embedded run."""
    from fellrec.runtime.checkpoint import load_checkpoint

    def die(grid, msg):
        if msg.metadata.message_type == "train" and int(msg.content["config"]["round"]) == 2:
            assert msg.content["check"]["round"] == 1 and msg.content["check"]["same-arrays"]
            raise ServerDied

    cfg = load_config(None, [*THREE, "train.algorithm=fellrec", "name=fellrec"])
    with pytest.raises(ServerDied):
        serve(cfg, tmp_path / "run", tmp_path, on_deliver=die)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # round 1 is done, its line not yet
    _, meta = load_checkpoint(tmp_path / "run")
    assert meta["round"] == 1 and meta["pending"]["round"] == 1 and "valid" not in meta["pending"]
    grid = serve(cfg, tmp_path / "run", tmp_path, resume=True)
    assert_same_run(tmp_path / "run", embedded["fellrec"])
    assert Counter(t for t, _ in grid.delivered) == {"query.whoami": 3, "query": 3, "train": 3, "evaluate": 3,
                                                     "evaluate.test": 3}


@pytest.mark.slow
def test_missing_clients_are_named_after_the_wait(tmp_path):
    cfg = load_config(None, [*THREE, "train.algorithm=fedavg", "name=x", "train.rounds=1"])
    nodes = {100: {"client-id": 0, "state-dir": str(tmp_path / "s0")}}
    with pytest.raises(ClientFailed, match=r"no SuperNode for client\(s\) \['1', '2'\]"):
        serve(cfg, tmp_path / "run", tmp_path, nodes=nodes)


def test_the_server_refuses_what_has_no_flower_form(tmp_path):
    cfg = load_config(None, [*THREE, "train.algorithm=centralized", "name=x"])
    with pytest.raises(ConfigError, match=r"train\.algorithm: centralized"):
        serve(cfg, tmp_path / "run", tmp_path)


def test_exchange_names_the_clients_that_never_answer():
    class Silent(LocalGrid):
        def pull_messages(self, ids):
            return []

    grid = Silent({}, {})
    nodes = Nodes(grid, timeout_s=0.2, poll_s=0.05)
    nodes.node_of = {"0": 5, "1": 6}
    nodes.asked = {5, 6}
    grid.nodes = {5: {}, 6: {}}
    with pytest.raises(ClientFailed, match=r"no answer from client\(s\) \['0', '1'\] within 0 s"):
        nodes.exchange("train", {"0": RecordDict, "1": lambda: RecordDict({"config": ConfigRecord({})})})


# ---- a real local deployment --------------------------------------------------------------------


def flower_run(dep: deploy.LocalDeployment, cfg, run_dir: Path, timeout_s: float = 900, on_poll=None) -> dict:
    run_id = deploy.submit(dep.cli_home, deploy.CONNECTION, {"fellrec-config": dump(cfg), "run-dir": str(run_dir)},
                           run_dir.parent / f"{run_dir.name}-run-config.toml")
    return deploy.wait_run(dep.cli_home, deploy.CONNECTION, run_id, timeout_s=timeout_s, poll_s=2.0,
                           on_poll=on_poll)


def test_a_failed_run_is_reported_as_failed_not_by_exit_code(tmp_path, monkeypatch):
    """A ServerApp that raises leaves flwr run's exit code at 0; wait_run reads the recorded status."""
    calls = iter([{"status": "running"}, {"status": "finished:failed", "status-details": "ServerApp failed: boom"}])
    monkeypatch.setattr(deploy, "status", lambda *a: next(calls))
    monkeypatch.setattr(deploy, "flwr", lambda *a, **k: type("Done", (), {"stdout": "log tail", "returncode": 0})())
    with pytest.raises(deploy.RunFailed, match="finished:failed: ServerApp failed: boom"):
        deploy.wait_run(tmp_path, "c", 7, timeout_s=5, poll_s=0.0)


# ---- split mode (flexible storage) over Flower ----------------------------------------------------

# tiny-random has 2 blocks: k = 0 leaves block 0 to the server. LoRA dropout 0: with dropout the
# trunk's masks come from the server's stream, not the client's as in the embedded run.
SPLIT = [*THREE, "train.rounds=1", "storage.k=0", "model.lora.dropout=0", "eval.batch_size=4",
         "train.algorithm=fedavg", "name=split"]
BIGREC = [*SPLIT, "model.backbone=bigrec", "model.num_beams=2", "model.max_new_tokens=6", "eval.max_test_samples=9",
          "name=split-bigrec"]


def embedded_split_run(root: Path, sets: list[str]) -> Path:
    """The embedded split run of ``sets``. A first run of no round puts the frozen base model's item
    vectors into the cache: otherwise the embedded runtime computes them inside client 0's first
    local training and counts their activations among that training's split bytes (the Flower
    server computes them itself)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FELLREC_CACHE", str(root / "cache"))
        run(load_config(None, [*sets, "train.rounds=0", "name=warm"]), root, progress=False)
        return run(load_config(None, sets), root, progress=False)


@pytest.fixture(scope="module")
def embedded_split(tmp_path_factory):
    return embedded_split_run(tmp_path_factory.mktemp("embedded-split"), SPLIT)


@pytest.mark.slow
def test_split_mode_over_flower_reproduces_the_embedded_split_run(tmp_path, embedded_split):
    grid = serve(load_config(None, SPLIT), tmp_path / "run", tmp_path)
    assert_same_run(tmp_path / "run", embedded_split)  # losses, split bytes, metrics, adapters
    kinds = Counter(k for k, _ in grid.delivered)
    # 2 local steps at k = 0, gradient clipping on (the default): the first forward; its backward; the step
    # (its clipping factor needs the trunk's norm from the backward's reply) with the next forward; the last
    # backward; the last step with the update. Validation and test: every micro-batch in one message, then the result.
    assert (kinds["train"], kinds["train.split"]) == (3, 12)
    assert (kinds["evaluate"], kinds["evaluate.split"]) == (3, 3)
    assert (kinds["evaluate.test"], kinds["evaluate.test_split"]) == (3, 3)
    assert kinds["query.split"] == 3
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    traffic = results["runtime"]["split"]
    assert traffic["train"]["requests"] == 3 * (2 * 2 + 2)  # per client: 2 forwards, 2 backwards, 2 steps
    assert traffic["evaluate"]["requests"] > 3 and traffic["evaluate.test"]["requests"] > 3  # micro-batches
    first = lines(tmp_path / "run" / "metrics.jsonl")[0]
    assert all(m["split_bytes_up"] > 0 and m["split_bytes_down"] > 0 for m in first["train"].values())
    for i in range(3):  # the client keeps its part; the run's adapter is its part and the trunk's
        (folder,) = (tmp_path / f"state-{i}").iterdir()
        kept = load_file(folder / f"client-{i}" / "adapter.safetensors")
        whole = load_file(tmp_path / "run" / "adapters" / f"client-{i}.safetensors")
        assert kept and not any(".layers.0." in k for k in kept)
        assert set(whole) - set(kept) and all(".layers.0." in k for k in set(whole) - set(kept))


@pytest.mark.slow
def test_a_split_client_holds_no_trunk_weights(tmp_path):
    from fellrec import build
    from fellrec.build import build_backbone, keep_client_half
    from fellrec.runtime.flower.plain import ClientNode

    cfg = load_config(None, SPLIT)
    backbone = build_backbone(cfg, ["Heat (1995)", "Up (2009)", "Alien (1979)"], "ml-100k")
    trunk = [weakref.ref(p) for p in backbone.model.server.trunk.parameters()]
    keep_client_half(backbone)  # what a split client does with the model it builds whole
    gc.collect()
    assert trunk and all(ref() is None for ref in trunk)  # built whole to be cut, then freed
    node = ClientNode(dump(cfg), "0", tmp_path / "state", ProcessCache(), build)  # a model of its own
    model = node.backbone.model
    assert {n.split(".")[1] for n, _ in model.named_parameters()} <= {"embed_tokens", "tail", "norm", "lm_head"}
    assert node.parts.initial and not any(".layers.0." in k for k in node.parts.initial)  # block 0 is the server's


@pytest.mark.slow
def test_a_split_client_whose_node_restarts_mid_exchange_goes_on_from_its_disk(tmp_path, embedded_split):
    """Client 1's SuperNode dies after its first train.split message (its reply is lost); it comes back
    as another node with the same state folder and the message is sent again."""
    grid = serve(load_config(None, SPLIT), tmp_path / "run", tmp_path,
                 on_deliver=restart_client_1("train.split", tmp_path / "state-1"))
    assert ("train.split", 201) in grid.delivered
    assert json.loads((tmp_path / "run" / "results.json").read_text())["runtime"]["messages_resent"] >= 1
    assert_same_run(tmp_path / "run", embedded_split)


@pytest.mark.slow
def test_split_bigrec_over_flower_trains_validates_and_generates_as_the_embedded_run(tmp_path):
    expected = embedded_split_run(tmp_path / "embedded", BIGREC)
    grid = serve(load_config(None, BIGREC), tmp_path / "run", tmp_path)
    assert_same_run(tmp_path / "run", expected)
    kinds = Counter(k for k, _ in grid.delivered)
    assert kinds["evaluate.test_split"] > 3  # beam search: a round trip per generated token


# ---- FedPA: one private user per client ------------------------------------------------------------

FEDPA = ["model.backbone=ctr", "data.kcore=0", "fedpa.public_fraction=0.996", "fedpa.pretrain_epochs=1",
         "train.rounds=2", "name=fedpa"]  # 4 private users of ML-100K


@pytest.mark.slow
def test_fedpa_over_flower_reproduces_the_embedded_run_through_a_restart(tmp_path, monkeypatch):
    from fellrec.fedpa import build as fedpa_build
    from fellrec.runtime.flower.plain import ClientNode

    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, FEDPA)
    embedded_dir = run(cfg, tmp_path / "embedded", progress=False)
    nodes = {100 + i: {"client-id": i, "state-dir": str(tmp_path / f"state-{i}")} for i in range(4)}
    grid = serve(cfg, tmp_path / "run", tmp_path, nodes=nodes,
                 on_deliver=restart_client_1("train", tmp_path / "state-1"))
    flower_dir = tmp_path / "run"
    close(lines(embedded_dir / "metrics.jsonl"), lines(flower_dir / "metrics.jsonl"), "metrics")
    res_e = json.loads((embedded_dir / "results.json").read_text())
    res_f = json.loads((flower_dir / "results.json").read_text())
    assert res_f["users"]["private"] == 4 and res_f["algorithm"] == "fedpa:fedpa"
    for key in ("overall", "valid", "best_round", "per_round", "communication", "users", "samples", "pretrain",
                "rounds", "select_by"):
        close(res_e[key], res_f[key], key)
    a, b = load_file(embedded_dir / "adapters" / "server.safetensors"), load_file(flower_dir / "adapters" /
                                                                                     "server.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert res_f["runtime"]["messages_resent"] == 1  # client 1's first training, to its new node
    kinds = Counter(k for k, _ in grid.delivered)
    assert (kinds["train"], kinds["evaluate"], kinds["evaluate.test"]) == (2 * 4 + 1, 4, 4)  # round 1 validated in 2
    # each user's private state is on its own disk: the foundation it was sent, its rounds
    for i in range(4):
        folder = next((tmp_path / f"state-{i}").glob("fedpa-*/client-*"))
        assert {"setup.safetensors", "data.pkl", "state-2-0.safetensors", "state-2-1.safetensors"} <= \
            {p.name for p in folder.iterdir()}
        own = ClientState(folder).before(2, 1)  # after its training in round 2
        assert own[0]["own"].numel() > 0 and own[1]["rounds"] == [1]  # the user's own rows and adapter
    with pytest.raises(ValueError, match=r"client-id=4: this FedPA run has clients 0\.\.3 \(one per private user\)"):
        ClientNode(dump(cfg), "4", tmp_path / "state-4", ProcessCache(), fedpa_build)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["frozen", "local-fedpa", "fedavg-full"])
def test_fedpa_baselines_over_flower_reproduce_the_embedded_runs(tmp_path, monkeypatch, algorithm):
    """No round at all (the frozen foundation), nothing shared (FedPA's model alone), the whole model shared."""
    monkeypatch.setenv("FELLREC_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [*FEDPA, f"train.algorithm={algorithm}", f"name={algorithm}", "train.lr=0.01"])
    embedded_dir = run(cfg, tmp_path / "embedded", progress=False)
    nodes = {100 + i: {"client-id": i, "state-dir": str(tmp_path / f"state-{i}")} for i in range(4)}
    serve(cfg, tmp_path / "run", tmp_path, nodes=nodes)
    close(lines(embedded_dir / "metrics.jsonl"), lines(tmp_path / "run" / "metrics.jsonl"), "metrics")
    res_e = json.loads((embedded_dir / "results.json").read_text())
    res_f = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res_f["algorithm"] == f"fedpa:{algorithm}" and res_f["rounds"] == (0 if algorithm == "frozen" else 2)
    for key in ("overall", "valid", "best_round", "per_round", "communication"):
        close(res_e[key], res_f[key], key)


@pytest.mark.slow
def test_split_item_tokens_over_flower_reproduce_the_embedded_split_run(tmp_path):
    """FedProx, whose trunk part of the proximal term the ServerApp's trunk adds (with μ large enough to
    matter); the embedded split run equals the unsplit one (tests/storage/test_storage.py)."""
    sets = [*ITEMS, "train.rounds=1", "storage.k=0", "model.lora.dropout=0", "model.lora.last_blocks=null",
            "train.algorithm=fedprox", "train.prox_mu=1.0", "train.local_steps=3", "name=split-items"]
    expected = embedded_split_run(tmp_path / "embedded", sets)
    serve(load_config(None, sets), tmp_path / "run", tmp_path)
    assert_same_run(tmp_path / "run", expected)


def _workers():
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):  # one killed a moment ago may be a zombie
            if "fellrec.runtime.flower.worker" in " ".join(p.cmdline()):
                found.append(p)
    return found


@pytest.mark.slow
def test_workers_keep_clients_between_messages_and_a_killed_one_changes_nothing(tmp_path, embedded):
    """worker=true: each client's messages go to one process that outlives them (issue 17 §2). Killing
    every worker after client 1's first training message (mid-round) starts new ones from the disk; so does
    killing client 2's worker while it works on a message of round 2 (the ClientApp asks a new one)."""
    nodes = {100 + i: {"client-id": i, "state-dir": str(tmp_path / f"state-{i}"), "worker": "true",
                       "worker-idle-s": 120} for i in range(3)}
    killed, busy_killed, trains = [], [], []

    def kill_workers(grid, msg):
        if msg.metadata.message_type != "train":
            return
        client = grid.nodes[msg.metadata.dst_node_id]["client-id"]
        trains.append(client)
        if client == 1 and not killed:
            killed.extend(_workers())
            for p in killed:
                p.kill()
                p.wait()
        elif client == 2 and trains.count(2) == 2:  # round 2: kill its worker while it holds a message
            threading.Thread(target=kill_the_busy_worker, daemon=True).start()

    def kill_the_busy_worker():  # the clients' messages run at once: find client 2's worker by its log
        log = (tmp_path / "state-2" / "worker-client-2.log").read_text()
        worker = psutil.Process(int(re.findall(r"worker (\d+) listening", log)[-1]))
        end = time.monotonic() + 60
        while time.monotonic() < end:
            with contextlib.suppress(psutil.Error):
                if len(worker.net_connections(kind="unix")) >= 2:  # listening, and connected to the ClientApp
                    worker.kill()
                    busy_killed.append(worker.pid)
                    return
            time.sleep(0.005)

    cfg = load_config(None, [*THREE, "train.algorithm=fedavg", "name=fedavg"])
    try:
        serve(cfg, tmp_path / "run", tmp_path, nodes=nodes, on_deliver=kill_workers)
        assert_same_run(tmp_path / "run", embedded["fedavg"])
        rows = [json.loads(x) for x in (tmp_path / "run" / "messages.jsonl").read_text().splitlines()]
        # every reply but whoami's is in messages.jsonl with its timing, and every one came from a worker
        assert sorted({r["type"] for r in rows}) == ["evaluate", "evaluate.test", "query", "train"]
        # setup, 2 rounds of training, the last round's validation (round 1's came with round 2's training), test
        assert len(rows) == 3 + 6 + 3 + 3
        assert sorted(r["round"] for r in rows if r["type"] == "evaluate") == ["evaluate-2"] * 3
        assert all(r["worker"] > 0 and r["worker"] != os.getpid() for r in rows)
        assert {p.pid for p in killed} == {int(r["worker"]) for r in rows if r["type"] == "query"} and len(killed) == 3
        for c in ("0", "1", "2"):
            pids = [int(r["worker"]) for r in rows if r["client"] == c]
            # one worker before the kill, one after; client 2's second was killed while it worked in round 2
            assert len(set(pids)) == (3 if c == "2" else 2)
            assert pids == sorted(pids, key=pids.index)  # ... and each served a run of messages in a row
        assert len(busy_killed) == 1 and busy_killed[0] in {int(r["worker"]) for r in rows if r["client"] == "2"}
        last = max(r["pulled"] for r in rows if int(r["worker"]) == busy_killed[0])  # its last reply
        after = [r for r in rows if r["client"] == "2" and r["pushed"] >= last]
        assert after and all(int(r["worker"]) not in busy_killed + [p.pid for p in killed] for r in after)
        assert (tmp_path / "state-2" / "worker-client-2.log").read_text().count("listening on") == 3
        for r in rows:  # the times are in order, and the parts fit in the time the message took
            assert r["pushed"] <= r["called"] <= r["returned"] <= r["pulled"]
            assert 0 <= r["build"] + r["model"] + r["work"] <= r["returned"] - r["called"] + 1e-6
            assert r["bytes_received"] > 0 and (r["bytes_sent"] > 0) == (r["type"] != "query")  # setup sends nothing
        for pid in {r["worker"] for r in rows}:  # a worker builds the base model for its first message only
            assert all(r["model"] == 0 for r in [r for r in rows if r["worker"] == pid][1:] if r["type"] == "train")
    finally:
        for p in _workers():
            p.kill()
