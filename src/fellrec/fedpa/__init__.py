"""FedPA (Zhang et al., IJCAI 2024): federated adaptation of a pre-trained attribute-based CTR model
with a frozen backbone, per-user and per-group low-rank adapters and an adaptive gate.

research/fedpa.md holds the notes this follows. Pieces:

- ``features``: attribute codes, labels, the public/private users and the per-user split;
- ``model``: the foundation CTR model and the FedPA model over one shared frozen backbone;
- ``pretrain``: Open_Train (central pre-training on the public users) and its checkpoint;
- ``client``: the per-user ClientTrainer and ``build_federation`` (FedPA and its baselines);
- ``metrics``: pooled AUC, GAUC, logloss, weighted P/R/F1.

The server side is ``fellrec.strategies.fedpa.FedPA``.
"""

from fellrec.fedpa.features import FeatureTable, UserSplit, build_features, select_public, split_users
from fellrec.fedpa.metrics import ctr_metrics
from fellrec.fedpa.model import CTRModel, FedPAModel
from fellrec.fedpa.pretrain import load_pretrained, pretrain, save_pretrained
from fellrec.fedpa.trainer import ALGORITHMS, Federation, FedPATrainer, build_federation, pooled_selection

__all__ = [
           "ALGORITHMS",
           "CTRModel",
           "FeatureTable",
           "FedPAModel",
           "FedPATrainer",
           "Federation",
           "UserSplit",
           "build_features",
           "build_federation",
           "ctr_metrics",
           "load_pretrained",
           "pooled_selection",
           "pretrain",
           "save_pretrained",
           "select_public",
           "split_users",
]
