"""Small nonlinear map f: d_s → hidden → d_t (GELU), METHOD §4 / paper Appendix B.

Trained with MSE on centred train pairs, AdamW, batch 512, validation MSE every
5 epochs, early stopping with patience 12 epochs, at most 300 epochs, seed 42;
the best-validation weights are kept. The paper's learning rate and weight decay
were lost in extraction, so ours are documented choices: lr 1e-3 (Adam's usual
default) and weight decay 1e-2 (AdamW's default in PyTorch).

Training reads its train pairs as a stream of batches (:data:`Batches`: epoch → batches of
centred (source, target) rows), so it can train from the store's seeded, shuffled, bounded-memory
reader (``Store.batches(..., paired_with=...)``, what the fit flow passes) as well as from arrays
in memory (:meth:`MLPMapper.fit`: a seeded permutation per epoch).

A direction is mapped as f(v) − f(0) (our choice, METHOD §4): it removes the
output offset f(0) so that the zero direction maps to zero, as for linear maps.
Training runs on CPU or CUDA; on CPU it is bit-for-bit reproducible (seeded
initialisation and shuffling, deterministic algorithms switched on only for the
duration of the fit). The fitted map always evaluates on CPU in float32, so a
fitted map and one rebuilt with ``from_state`` give identical outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar, Self

import numpy as np
import torch
from torch import nn

from safeport.mappers.base import NamedMap, Params, State, as_matrix, as_vector, check_anchor_splits, require_state

_STATE_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
# One epoch (1, 2, ...) of training batches: pairs of centred source and target rows.
Batches = Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]]
_EVAL_BATCH = 4096


class _Net(nn.Module):
    """d_s → hidden → d_t with one GELU; state keys are ``fc1.*`` / ``fc2.*``."""

    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; a missing CUDA is a clear error, not a crash later."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    return dev


@contextmanager
def deterministic_torch(enabled: bool) -> Iterator[None]:
    """Turn on deterministic algorithms for a block and restore the caller's setting afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _build(d_in: int, hidden: int, d_out: int, seed: int) -> _Net:
    """Initialise on CPU from ``seed`` without disturbing the global RNG of the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _Net(d_in, hidden, d_out)


def _mse(net: nn.Module, X: torch.Tensor, Y: torch.Tensor) -> float:
    """Mean squared error over all elements, in batches so large validation sets fit in memory."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, X.shape[0], _EVAL_BATCH):
            diff = net(X[start : start + _EVAL_BATCH]) - Y[start : start + _EVAL_BATCH]
            total += float(torch.sum(diff.double() ** 2))
    return total / (Y.shape[0] * Y.shape[1])


def _copy_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}


@dataclass(frozen=True)
class TrainLog:
    """What early stopping did, recorded in the map's params."""

    epochs_run: int
    best_epoch: int
    best_val_loss: float


@dataclass(frozen=True, eq=False)
class MLPMap(NamedMap):
    """The fitted network (on CPU, float32) plus its lineage params."""

    net: _Net
    fit_params: Params = field(default_factory=dict)
    map_name: ClassVar[str] = "mlp"

    @property
    def source_dim(self) -> int:
        return int(self.net.fc1.in_features)

    @property
    def target_dim(self) -> int:
        return int(self.net.fc2.out_features)

    @property
    def hidden(self) -> int:
        return int(self.net.fc1.out_features)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, x.shape[0], _EVAL_BATCH):
                chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + _EVAL_BATCH], dtype=np.float32))
                out.append(self.net(chunk).numpy().astype(np.float64))
        return np.concatenate(out, axis=0)

    def rows(self, X: np.ndarray) -> np.ndarray:
        x = as_matrix(X, "X")
        if x.shape[1] != self.source_dim:
            raise ValueError(f"X has dim {x.shape[1]} but the mlp map expects {self.source_dim}")
        return self._forward(x)

    def direction(self, v: np.ndarray) -> np.ndarray:
        """f(v) − f(0): the shift the network applies when the input moves by v from the (centred) origin."""
        x = as_vector(v, "v", self.source_dim)
        out = self._forward(np.stack([x, np.zeros_like(x)]))
        return out[0] - out[1]

    def state(self) -> State:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.net.state_dict().items()}

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], params: Mapping[str, float | int | str]) -> Self:
        require_state(state, _STATE_KEYS, cls.map_name)
        hidden, d_in = np.shape(state["fc1.weight"])
        d_out = np.shape(state["fc2.weight"])[0]
        net = _Net(int(d_in), int(hidden), int(d_out))
        try:
            net.load_state_dict({k: torch.from_numpy(np.array(state[k], dtype=np.float32)) for k in _STATE_KEYS})
        except RuntimeError as err:
            raise ValueError(f"mlp state arrays have inconsistent shapes: {err}") from err
        net.eval()
        return cls(net=net, fit_params=dict(params))


@dataclass(frozen=True)
class MLPMapper:
    """Hyper-parameters of the MLP map; defaults are METHOD §4 plus our lr / weight-decay choice."""

    hidden: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 512
    max_epochs: int = 300
    val_every: int = 5
    patience: int = 12
    seed: int = 42
    device: str = "auto"

    def __post_init__(self) -> None:
        for key in ("hidden", "batch_size", "max_epochs", "val_every", "patience"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"mlp option {key} must be >= 1, got {getattr(self, key)}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got lr={self.lr}, wd={self.weight_decay}")

    @property
    def name(self) -> str:
        return MLPMap.map_name

    def fit(self, A_train: np.ndarray, B_train: np.ndarray, A_val: np.ndarray, B_val: np.ndarray) -> MLPMap:
        """Train on arrays in memory: each epoch a seeded permutation of the train rows, cut in batches."""
        a, b, a_val, b_val = check_anchor_splits(A_train, B_train, A_val, B_val)
        shuffle = torch.Generator().manual_seed(self.seed)

        def batches(epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
            order = torch.randperm(a.shape[0], generator=shuffle).numpy()
            for start in range(0, a.shape[0], self.batch_size):
                idx = order[start : start + self.batch_size]
                yield a[idx], b[idx]

        return self.fit_stream(batches, a_val, b_val, a.shape[0])

    def fit_stream(self, batches: Batches, A_val: np.ndarray, B_val: np.ndarray, n_train: int) -> MLPMap:
        """Train on ``batches(epoch)`` (centred train pairs, epochs 1, 2, ...); validate on the arrays."""
        a_val, b_val = as_matrix(A_val, "A_val"), as_matrix(B_val, "B_val")
        device = resolve_device(self.device)
        net = _build(a_val.shape[1], self.hidden, b_val.shape[1], self.seed)
        with deterministic_torch(device.type == "cpu"):
            log = self._train(net, device, batches, _tensor(a_val, device), _tensor(b_val, device))
        net.to("cpu").eval()
        params: Params = {
            "hidden": self.hidden,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
            "max_epochs": self.max_epochs,
            "val_every": self.val_every,
            "patience": self.patience,
            "seed": self.seed,
            "device": device.type,
            "epochs_run": log.epochs_run,
            "best_epoch": log.best_epoch,
            "best_val_loss": log.best_val_loss,
            "n_train": int(n_train),
            "n_val": int(a_val.shape[0]),
        }
        return MLPMap(net=net, fit_params=params)

    def _train(
        self,
        net: _Net,
        device: torch.device,
        batches: Batches,
        a_val: torch.Tensor,
        b_val: torch.Tensor,
    ) -> TrainLog:
        """AdamW epochs; validate every ``val_every``; stop once ≥ ``patience`` epochs bring no new best."""
        net.to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        best_loss, best_epoch, best_state = math.inf, 0, _copy_state(net)
        epoch = 0
        for epoch in range(1, self.max_epochs + 1):
            net.train()
            for a_batch, b_batch in batches(epoch):
                loss = nn.functional.mse_loss(net(_tensor(a_batch, device)), _tensor(b_batch, device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if epoch % self.val_every and epoch != self.max_epochs:
                continue
            net.eval()
            val = _mse(net, a_val, b_val)
            if val < best_loss:
                best_loss, best_epoch, best_state = val, epoch, _copy_state(net)
            elif epoch - best_epoch >= self.patience:
                break
        net.load_state_dict(best_state)
        return TrainLog(epochs_run=epoch, best_epoch=best_epoch, best_val_loss=best_loss)


def _tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
