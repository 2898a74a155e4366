"""One small Trainer: epochs, validation with early stopping, checkpoints, resume, progress.

The Trainer knows nothing of models or losses: it is given a ``step_loss(batch) -> loss`` and an
``evaluate() -> metrics`` closure and the name of the metric to maximise. A run folder holds
``config.json`` (resolved), ``log.txt``, ``metrics.jsonl`` (one line per epoch), ``last.pt``
(everything needed to resume, the best weights and the config included), ``prev.pt`` (the
checkpoint before) and ``best.pt`` (the best model's ``state_dict``). Checkpoints hold tensors and
plain values only, are loaded with ``weights_only=True`` and carry a sha256 of their content.
Every file is written whole or not at all (``store.write_atomic``). Under torchrun the step runs
in DistributedDataParallel, each rank on its share of every global batch (``cascade.distributed``);
rank 0 alone writes and validates. Resuming reads last.pt, or
prev.pt when last.pt is damaged (said in the log), and refuses a changed config naming the keys;
a run with no readable checkpoint stops with a ``CheckpointError`` (``--restart`` starts over).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from queue import Empty, Queue
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cascade import distributed
from cascade.data.lists import ListBatch
from cascade.data.store import write_atomic, write_text_atomic
from cascade.saved import finished
from cascade.data.stream import SampleStream

PIPED_EVERY = 30.0  # seconds between progress lines when stdout is not a terminal


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 2  # epochs without improvement before stopping
    seed: int = 0
    monitor: str = "auc"  # validation metric to maximise
    device: str = "cpu"  # torch device the model and the training split live on, e.g. "cuda"
    # "bf16": the training step's forward under bf16 autocast, fp32 master weights. Only where the
    # hardware has bf16 units (GPUs, AMX / AVX512-BF16 CPUs); on an AVX2-only CPU it is ~10x slower.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got '{self.precision}'")
        at_least(self, epochs=1, batch_size=1, patience=1, seed=0, weight_decay=0)
        above(self, lr=0)


def at_least(cfg: object, **lows: float) -> None:
    """ValueError naming the first of ``cfg``'s fields below its lower bound (None passes)."""
    for key, low in lows.items():
        value = getattr(cfg, key)
        if value is not None and value < low:
            raise ValueError(f"{key}: {value!r} is below {low}")


def above(cfg: object, **lows: float) -> None:
    """ValueError naming the first of ``cfg``'s fields not strictly above its bound (None passes)."""
    for key, low in lows.items():
        value = getattr(cfg, key)
        if value is not None and value <= low:
            raise ValueError(f"{key}: {value!r} must be above {low}")


class RunError(RuntimeError):
    """A run that cannot start or go on; the message names the file or key and what to do."""


class CheckpointError(RunError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


BUCKET_POOL = 50  # batches whose rows are sorted by length together: similar lengths, still a shuffle


@dataclass
class Tensors:
    """A split as tensors: user (R, Wu), items (R, N, Wi), label and mask (R, N); for list
    training also the teacher's logits and the logged stage (R, N); for a loss that weighs its
    rows, each row's weight (R,)."""

    user: torch.Tensor
    items: torch.Tensor
    label: torch.Tensor
    mask: torch.Tensor
    teacher: torch.Tensor | None = None
    stage: torch.Tensor | None = None
    weight: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.user)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Tensors":
        return Tensors(*(None if t is None else fn(t) for t in (getattr(self, f.name) for f in fields(self))))

    def batches(self, size: int, generator: torch.Generator | None = None) -> Iterator["Tensors"]:
        """Batches in a random order drawn from ``generator`` (on the CPU, so the order is the
        same whatever the device), or in order without one.

        Random batches of lists of different lengths (padding after a list's last candidate, e.g.
        a stage's top-m plus every logged positive) are bucketed: each pool of ``BUCKET_POOL``
        batches' rows is sorted by length and cut into batches, each batch cut to its longest list,
        and the batches are shuffled. Every loss is blind to padding (``losses.sorting``), so this
        changes which lists share a batch, not what a list contributes; lists of one length (the
        usual recall top-n) take the plain shuffle."""
        order = torch.randperm(len(self), generator=generator) if generator is not None else torch.arange(len(self))
        lengths = self.list_lengths() if generator is not None else None  # scoring never reads the mask back
        if lengths is not None and len(lengths) and lengths.min() < lengths.max():
            yield from self._bucketed(order, lengths, size, generator)
            return
        order = order.to(self.user.device)
        for a in range(0, len(self), size):
            idx = order[a : a + size]
            yield self._map(lambda t: t[idx])

    def _bucketed(self, order: torch.Tensor, lengths: torch.Tensor, size: int, generator: torch.Generator) -> Iterator["Tensors"]:
        """``batches``' bucketing: rows in ``order`` sorted by ``lengths`` within pools of
        ``BUCKET_POOL`` batches, the batches shuffled, each cut to its longest list."""
        chunks = []
        for a in range(0, len(self), size * BUCKET_POOL):
            pool = order[a : a + size * BUCKET_POOL]
            pool = pool[torch.sort(lengths[pool], stable=True).indices]
            chunks += list(pool.split(size))
        for c in torch.randperm(len(chunks), generator=generator).tolist():
            idx, width = chunks[c].to(self.user.device), int(lengths[chunks[c]].max())
            yield self._map(lambda t: t[idx]).cut(width)

    def list_lengths(self) -> torch.Tensor:
        """(R,) int64 on the CPU: one past each list's last valid candidate (0 for an empty list)."""
        mask = self.mask.cpu().bool()
        n = mask.shape[1]
        return torch.where(mask.any(1), n - mask.flip(1).int().argmax(1), 0)

    def cut(self, width: int) -> "Tensors":
        """Each list cut to its first ``width`` candidates (items, label, mask, teacher, stage)."""
        if width >= self.mask.shape[1]:
            return self
        return replace(self, items=self.items[:, :width], **{f: t[:, :width] for f in ("label", "mask", "teacher", "stage") if (t := getattr(self, f)) is not None})

    def to(self, device: torch.device | str) -> "Tensors":
        return self._map(lambda t: t.to(device))

    sharded = False  # every rank holds every row and takes its share of each global batch

    def steps(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)


class StreamedTensors:
    """Training rows streamed from parquet (``cascade.data.stream``): each batch of ``stream``
    packed by ``pack`` (ListBatch -> Tensors). Under torchrun each rank reads its share of the
    row groups (``sharded``) and makes batches of ``batch_size / world_size`` rows; one global
    batch is every rank's batch of the same step."""

    def __init__(self, stream: SampleStream, pack: Callable[[ListBatch], Tensors]):
        self.stream, self.pack, self.device = stream, pack, torch.device("cpu")
        parallel = distributed.data_parallel()
        self.rank, self.world = (distributed.rank(), distributed.world_size()) if parallel else (0, 1)
        self.sharded = self.world > 1
        groups = len(stream.counts())
        if groups < self.world:
            raise RunError(f"{stream.root / 'candidates.parquet'}: {groups} row group(s) for {self.world} processes; each process streams whole row groups, so run with data.stream: never, or fewer processes")

    def __len__(self) -> int:
        return len(self.stream)

    def steps(self, batch_size: int) -> int:
        return self.stream.steps(max(batch_size // self.world, 1), self.world)

    def to(self, device: torch.device | str) -> "StreamedTensors":
        self.device = torch.device(device)
        return self

    def batches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Tensors]:
        """The epoch's batches; the row groups' order and the shuffle drawn from ``generator``.
        A thread reads and packs the next pool while the step trains (Arrow and numpy release the GIL)."""
        seed = None if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
        size = max(batch_size // self.world, 1)
        for pool in prefetch(self.pack(x) for x in self.stream.pools(size, seed, (self.rank, self.world))):  # packed once per pool
            for a in range(0, len(pool), size):
                yield pool._map(lambda t: t[a : a + size]).to(self.device)


def prefetch(items: Iterator, depth: int = 8) -> Iterator:
    """``items``, made by a background thread up to ``depth`` ahead; its exception is raised here.
    While it runs, torch's intra-op threads leave that thread a core (``reader_core``)."""
    done = object()
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put(item)
            queue.put(done)
        except BaseException as e:  # noqa: BLE001  handed to the consumer
            queue.put(e)

    worker = threading.Thread(target=produce, daemon=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(reader_core(threads))
    worker.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:  # the consumer stopped early (an error, or a break): let the thread end
        torch.set_num_threads(threads)
        stop.set()
        while worker.is_alive():
            try:
                queue.get(timeout=0.1)
            except Empty:
                pass


def reader_core(threads: int) -> int:
    """Intra-op threads for a step that runs beside a reading thread: one core fewer, never none.
    A step's OpenMP threads wait for each other at every parallel region, so one that the reader
    holds off its core stalls them all: on this 2-core machine a streamed pointwise DSSM ran at
    31-45k samples/s with 2 threads and 43-48k with 1 (the in-memory loop: 42-60k with 2)."""
    return max(1, threads - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, model: nn.Module, cfg: TrainConfig, run_dir: str | Path, loss: nn.Module | None = None, unit: str = "samples"):
        """``loss``: the module holding a loss's own parameters (uncertainty weights), trained with
        the model and kept in ``last.pt`` so a resumed run has them; ``best.pt`` is the model's.
        ``unit``: what one training row is, for the logged rate ('samples': a (user, item) pair or
        a (request, positive) pair; 'lists': a request's whole candidate list)."""
        self.model = model
        self.unit = unit
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        device = torch.device(cfg.device)
        if distributed.data_parallel() and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
        self.device = device
        self.loss = (loss or nn.Module()).to(self.device)
        model.to(self.device)
        self.optimizer = torch.optim.Adam([*model.parameters(), *self.loss.parameters()], lr=cfg.lr, weight_decay=cfg.weight_decay)

    def log(self, text: str) -> None:
        if not distributed.is_writer():
            return
        with open(self.run_dir / "log.txt", "a") as f:
            f.write(text + "\n")
        tqdm.write(text)

    def fit(
        self,
        train: Tensors | StreamedTensors,
        step_loss: Callable[[Tensors], torch.Tensor],
        evaluate: Callable[[], dict[str, float]] | None,
        resolved_config: dict | None = None,
    ) -> dict:
        """Train with early stopping on ``cfg.monitor``; resume from ``last.pt`` if present.
        Returns the best epoch's metrics (and loads the best weights into the model). Without
        ``evaluate`` it trains a fixed schedule: every epoch runs and the last one is kept.
        Afterwards ``self.parallel`` holds ``world_size`` and the rows each rank trained on."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        resolved = json.loads(json.dumps(resolved_config or {"train": asdict(cfg)}, sort_keys=True))
        parallel = distributed.data_parallel()
        world, rank = (distributed.world_size(), distributed.rank()) if parallel else (1, 0)
        state = {"epoch": -1, "best": -math.inf, "best_epoch": -1, "bad_epochs": 0, "best_metrics": {}, "rows_per_rank": [0] * world}
        state, best_weights = self._restore(resolved, state)
        write_text_atomic(self.run_dir / "config.json", json.dumps(resolved, indent=2, sort_keys=True) + "\n")
        self._keep_metrics_through(state["epoch"] + 1)
        if len(state.get("rows_per_rank", ())) != world:  # a run resumed on another world size
            state["rows_per_rank"] = [0] * world
        train = train.to(self.device)
        step: Callable[[Tensors], torch.Tensor] = step_loss
        if parallel:  # DDP averages the ranks' gradients during backward, as one process would
            norms = global_batch_norm(self.model)
            step = nn.parallel.DistributedDataParallel(_Step(self.model, self.loss, step_loss), find_unused_parameters=True)
        for epoch in range(state["epoch"] + 1, cfg.epochs):
            if state["bad_epochs"] >= cfg.patience:
                break
            start = time.perf_counter()
            seen, total = self._epoch(train, step, epoch, (world, rank) if parallel else None)
            seconds = time.perf_counter() - start
            per_rank = distributed.gather((seen, total)) if parallel else [(seen, total)]
            state["rows_per_rank"] = [n + s for n, (s, _) in zip(state["rows_per_rank"], per_rank)]
            seen, total = sum(s for s, _ in per_rank), sum(t for _, t in per_rank)
            self.model.eval()
            with torch.no_grad():  # rank 0 validates; every rank takes its figures, so all stop together
                metrics = {} if evaluate is None else distributed.broadcast(evaluate() if rank == 0 else None)
            if evaluate is not None and cfg.monitor not in metrics:
                raise RunError(f"train.monitor: '{cfg.monitor}' is not among this run's validation metrics ({', '.join(metrics)})")
            own = getattr(self.model, "epoch_stats", None)  # a model's own figures of the epoch (TARQ's code usage; rank 0's in a parallel run)
            row = {"epoch": epoch + 1, "train_loss": total / max(seen, 1), "seconds": seconds, f"{self.unit}_per_s": seen / seconds, **(own() if own else {}), **metrics}
            if distributed.is_writer():
                with open(self.run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
            self.log(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            value = epoch if evaluate is None else metrics[cfg.monitor]
            if value > state["best"]:
                state.update(best=value, best_epoch=epoch + 1, bad_epochs=0, best_metrics=row)
                best_weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                write_atomic(self.run_dir / "best.pt", lambda f: torch.save(best_weights, f))
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch
            self._checkpoint({"model": self.model.state_dict(), "loss": self.loss.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(), "state": state, "best_model": best_weights, "config": json.dumps(resolved, sort_keys=True)})
        distributed.barrier()  # rank 0 has written best.pt
        if parallel:
            for m in norms:
                m.__class__ = nn.BatchNorm1d
        self.parallel = {"world_size": world, f"{self.unit}_per_rank": state["rows_per_rank"]}
        if (self.run_dir / "best.pt").exists():
            self.model.load_state_dict(torch.load(self.run_dir / "best.pt", weights_only=True, map_location=self.device))
        # no results.json here: the task writes it last, with its test figures, as the mark that
        # the run is complete (what `cascade run` and load_trained look for)
        return state["best_metrics"]

    def _restore(self, resolved: dict, state: dict) -> tuple[dict, dict | None]:
        """The training state and best weights of the newest readable checkpoint, loaded into the
        model, loss and optimizer (``state`` and None when there is none); ``RunError`` naming the
        keys when it was trained with another config."""
        ckpt = self._resume()
        if ckpt is None:
            return state, None
        changed = config_changes(json.loads(ckpt["config"]), resolved) if "config" in ckpt else []
        if changed:
            raise RunError(f"{self.run_dir}: its checkpoint was trained with another config ({'; '.join(changed[:5])}{'; ...' if len(changed) > 5 else ''}); run with --restart to train it from the start, or restore the config")
        self.model.load_state_dict(ckpt["model"])
        if "loss" in ckpt:  # runs saved before losses had parameters have none
            self.loss.load_state_dict(ckpt["loss"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"].cpu())
        best_weights = ckpt.get("best_model")
        if best_weights is not None:  # best.pt may be from an epoch whose checkpoint was lost
            write_atomic(self.run_dir / "best.pt", lambda f: torch.save(best_weights, f))
        self.log(f"resumed from {self.resumed_from} after epoch {ckpt['state']['epoch'] + 1}")
        return ckpt["state"], best_weights

    def _epoch(self, train: Tensors | StreamedTensors, step: Callable[[Tensors], torch.Tensor], epoch: int, ranks: tuple[int, int] | None) -> tuple[int, float]:
        """One epoch of optimizer steps over ``train``'s batches (seeded by the epoch), with a bar
        on a terminal or a line every ``PIPED_EVERY`` seconds when piped; ``ranks`` (world size,
        this rank) in a data-parallel run. Returns (rows this rank trained on, their summed loss)."""
        cfg = self.cfg
        self.model.train()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        start, seen, total = time.perf_counter(), 0, 0.0
        show = None if distributed.is_writer() else True  # tqdm: None = a bar on terminals only
        bar = tqdm(train.batches(cfg.batch_size, gen), total=train.steps(cfg.batch_size), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=show)
        shown = time.perf_counter()  # piped output has no bar: a line every PIPED_EVERY seconds
        for i, batch in enumerate(bar, 1):
            weight = 1.0
            if ranks is not None and not train.sharded:  # (a sharded input gives each rank its own rows)
                world, rank = ranks
                if len(batch) < world:  # a last global batch too small to share: every rank skips it
                    continue
                # this rank's share of the global batch; weighted so that DDP's mean over ranks
                # is the mean over the global batch's rows
                rows = torch.tensor_split(torch.arange(len(batch), device=batch.user.device), world)[rank]
                weight = len(rows) * world / len(batch)
                batch = batch._map(lambda t: t[rows])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                loss = step(batch)
                if weight != 1.0:
                    loss = loss * weight
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            seen += len(batch)
            total += float(loss.detach()) / weight * len(batch)
            bar.set_postfix(loss=f"{total / seen:.4f}")
            if bar.disable and show is None and time.perf_counter() - shown > PIPED_EVERY:
                shown = time.perf_counter()
                print(f"  epoch {epoch + 1}/{cfg.epochs}: batch {i:,}/{bar.total:,} ({i / bar.total:.0%}), {seen / (shown - start):,.0f} {self.unit}/s, loss {total / seen:.4f}", flush=True)
        return seen, total

    # ----------------------------------------------------------------------------------------
    # checkpoints: last.pt (the newest) and prev.pt (the one before), each with a checksum

    def _checkpoint(self, ckpt: dict) -> None:
        """Save ``ckpt`` as last.pt, the older last.pt kept as prev.pt (a kill between the two
        leaves prev.pt alone, which resuming falls back to). Rank 0's alone in a group."""
        if not distributed.is_writer():
            return
        last, prev = self.run_dir / LAST, self.run_dir / PREVIOUS
        body = io.BytesIO()
        torch.save(ckpt, body)
        data = body.getvalue()
        sealed = {"format": CHECKPOINT_FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "body": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
        if last.exists():  # prev.pt becomes a second name of the current last.pt, then last.pt is
            # replaced whole: a kill at any point leaves last.pt old or new, prev.pt older or old
            link = self.run_dir / f".{PREVIOUS}.link"
            link.unlink(missing_ok=True)
            try:
                os.link(last, link)
            except OSError:  # a file system without hard links
                shutil.copyfile(last, link)
            os.replace(link, prev)
        write_atomic(last, lambda f: torch.save(sealed, f))

    def _resume(self) -> dict | None:
        """The newest readable checkpoint (last.pt, else prev.pt, saying so), or None for a new
        run; CheckpointError when checkpoints exist and none can be read."""
        self.resumed_from = None
        found = [p for p in (self.run_dir / LAST, self.run_dir / PREVIOUS) if p.exists()]
        problems = []
        for path in found:
            try:
                ckpt = read_checkpoint(path, self.device)
            except CheckpointError as e:
                problems.append(str(e))
                self.log(f"warning: {e}")
                continue
            if problems:
                self.log(f"warning: falling back to {path}, the checkpoint before")
            self.resumed_from = path
            return ckpt
        if problems:
            raise CheckpointError("; ".join(problems) + "; run again with --restart to train this run from the start")
        return None

    def _keep_metrics_through(self, epochs: int) -> None:
        """metrics.jsonl keeps the rows of the epochs the resumed state has (a run killed after
        writing a row but before its checkpoint would otherwise hold that epoch twice)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= epochs:
                rows.append(line)
        write_text_atomic(path, "".join(r + "\n" for r in rows))


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch: the ranks' sums are
    all-reduced (differentiably), so a data-parallel step normalises as one process would on the
    same rows. torch's SyncBatchNorm does this on GPUs only. input (R, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and distributed.data_parallel()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        stats = all_reduce(torch.cat([x.sum(0), (x * x).sum(0), x.new_full((1,), float(x.shape[0]))]))
        n = stats[2 * c]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp(min=0.0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(m * mean.detach())
            self.running_var.mul_(1 - m).add_(m * var.detach() * n / (n - 1).clamp(min=1))
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def global_batch_norm(model: nn.Module) -> list[nn.Module]:
    """Turn ``model``'s BatchNorm1d layers into GlobalBatchNorm1d in place (same parameters and
    buffers, so the state dict is unchanged); returns them, to be turned back after training."""
    norms = [m for m in model.modules() if type(m) is nn.BatchNorm1d]
    for m in norms:
        m.__class__ = GlobalBatchNorm1d
    return norms


class _Step(nn.Module):
    """A training step as a module, so DistributedDataParallel sees the model's (and the loss's)
    parameters and hooks their gradients, whatever methods of the model the step calls."""

    def __init__(self, model: nn.Module, loss: nn.Module, step_loss: Callable[[Tensors], torch.Tensor]):
        super().__init__()
        self.model, self.loss, self.step_loss = model, loss, step_loss

    def forward(self, batch: Tensors) -> torch.Tensor:
        return self.step_loss(batch)


LAST, PREVIOUS = "last.pt", "prev.pt"
CHECKPOINT_FORMAT = 2
# keys a resumed run may change: how long it trains, where, from which file it was read, and how
# the path of a source it was made from is spelled
RESUMABLE_CHANGES = {"train.epochs", "train.patience", "train.device", "source", "out", "data.src"}


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """A checkpoint's content, its checksum verified; CheckpointError naming the file and what is
    wrong (truncated, corrupt, altered, not a checkpoint)."""
    try:
        sealed = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated, corrupt or not a checkpoint: never resume from it
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if not isinstance(sealed, dict):
        raise CheckpointError(f"{path}: not a checkpoint")
    if "sha256" not in sealed:  # written before checkpoints carried a checksum
        return sealed
    data = sealed["body"].numpy().tobytes()
    if hashlib.sha256(data).hexdigest() != sealed["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch (the file was altered or damaged)")
    return torch.load(io.BytesIO(data), weights_only=True, map_location=device)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for every leaf that differs, outside RESUMABLE_CHANGES. A key on one side
    only is a field a newer cascade added (with its default) or dropped: not a change of run."""
    out = []
    for key in sorted(set(old) & set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if name in RESUMABLE_CHANGES:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def clear_run(run_dir: Path) -> bool:
    """Remove a run folder to train it from the start (``--restart``); only a folder that holds
    a run (config.json or results.json), never anything else."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and ((run_dir / "config.json").exists() or finished(run_dir)):
        shutil.rmtree(run_dir)
        return True
    return False
