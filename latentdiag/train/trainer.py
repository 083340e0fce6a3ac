"""The reference trainer: Adam on an objective, per-epoch monitoring with the library's estimators, checkpoints
that rebuild and resume, mixed precision on CUDA, and DistributedDataParallel when launched by torchrun.

One optimiser step on a global batch of B datapoints (B = ``batch_size``, the same whatever the number of
processes):

1. the batch (and its augmentation, drawn from the data generator) is the same on every process; process r takes
   rows [start_r, stop_r) of it;
2. z_n = mu(x_n) + sigma(x_n) eps_n with eps (B, D) drawn for the whole global batch from the noise generator, so
   that a datapoint gets the same noise whether it is trained by one process or by several;
3. the objective (:mod:`latentdiag.train.objectives`) turns log p(x_n|z_n), KL_n (and the per-dimension KL) into
   the global-batch loss; under DDP each process backpropagates its share scaled so that the averaged gradients
   equal the single-process gradient on the same global batch.

Monitoring (every ``monitor_every`` epochs, on ``test_data``) is one pass of the library's accumulators over the
test set (:func:`latentdiag.estimators.fold.fold`: the model in eval mode without autocast, each batch encoded
once): the ELBO's rate (analytic or Monte Carlo KL) and distortion on the same samples, the -ELBO bits/dim from
the two, the importance-weighted bound (:func:`latentdiag.iw_nll`) when ``iw_samples`` > 0, and the encoded table
behind the index-code mutual information and marginal-KL brackets of :func:`latentdiag.aggregate_posterior`
(flagged when saturated at log N). Under DDP every process takes part: the pass is sharded across them and each
gets the same numbers.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from latentdiag._distributions import analytic_kl, diagonal_marginals, is_diagonal_normal, kl_divergence
from latentdiag._random import child_seed, stream_seed
from latentdiag._runtime import evaluation, resolve_device
from latentdiag._validation import check_choice, check_int, check_positive_float
from latentdiag.train.objectives import BatchTerms, Objective, Sync, objective_from_config

__all__ = ["TrainResult", "train", "evaluate", "flip_crop", "AUGMENTATIONS", "AMP_DTYPES", "load_training_data",
           "train_reference"]

AUGMENTATIONS: tuple[str, ...] = ("none", "flip_crop")
AMP_DTYPES: tuple[str, ...] = ("bfloat16", "float16")
_LN2 = math.log(2.0)
_TIMING_KEYS = ("seconds", "images_per_s")


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    model : nn.Module
        The trained model, in eval mode, on the training device.
    history : list of dict
        One record per epoch (all epochs, including those before a resume): ``epoch``, ``step``, ``train_loss``
        (the objective), ``train_neg_elbo``, ``train_rate``, ``train_distortion``, ``train_bpd`` (-ELBO in
        bits/dim), objective extras (``beta``, ``multiplier``, ``mmd``, ...), ``seconds``, ``images_per_s``, and
        when monitored: ``test_bpd`` (with ``test_bpd_bound``: ``"-ELBO"`` or ``"IW k=K"``), ``test_neg_elbo_bpd``,
        ``test_rate``, ``test_distortion``, ``test_iw_nll``, ``test_mi`` (with ``test_mi_saturated`` and
        ``test_log_n``), each with ``_stderr`` where it has one.
    checkpoint : Path or None
        The checkpoint file written after every epoch.
    settings : dict
        The run's settings (batch size, learning rate, objective, seed, device, AMP, world size, ...).
    notes : tuple of str
    """

    model: nn.Module
    history: list[dict[str, Any]]
    checkpoint: Path | None
    settings: dict[str, Any]
    notes: tuple[str, ...] = ()

    @property
    def last(self) -> dict[str, Any]:
        """The last epoch's record ({} when nothing was trained)."""
        return self.history[-1] if self.history else {}


# -- one training step as a module (so that DistributedDataParallel sees a forward call) ----------------------

class _Step(nn.Module):
    """forward(x, eps) -> (log p(x|z) (b,), KL (b,), per-dimension KL (b, D) or None, z (b, D))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        q, p = self.model.encode(x), self.model.prior()
        if is_diagonal_normal(q):
            loc, scale = diagonal_marginals(q)
            z = loc + scale * eps.to(loc)
        else:
            z = q.rsample()
        ll = self.model.log_likelihood(x, z.unsqueeze(0))[0]
        with torch.autocast(device_type=z.device.type, enabled=False):
            kl_dims = None
            if is_diagonal_normal(q) and is_diagonal_normal(p):
                kl_dims = analytic_kl(q.base_dist, p.base_dist).float()  # (Normal, Normal): always analytic
                kl = kl_dims.sum(-1)
            else:
                kl = kl_divergence(q, p, z=z)[0].float()  # one-draw Monte Carlo from z where torch has no formula
        return ll.float(), kl, kl_dims, z


class _DistSync(Sync):
    """Sums and row gathers over the default process group."""

    def __init__(self, world_size: int, rank: int):
        self.world_size, self.rank = world_size, rank

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = value.detach().clone()
        dist.all_reduce(out)
        return out

    def gather_rows(self, local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        import torch.distributed as dist

        width = max(sizes)
        pad = local.new_zeros((width - local.shape[0], *local.shape[1:]))
        padded = torch.cat([local.detach(), pad])
        bufs = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(bufs, padded)
        return torch.cat([local if r == self.rank else bufs[r][:sizes[r]] for r in range(self.world_size)])


# -- data -------------------------------------------------------------------------------------------------------

def flip_crop(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random horizontal flip (probability 1/2) and random crop after zero padding of ``padding`` pixels, per
    image of a batch (B, C, H, W), drawn from ``generator`` (the CIFAR-10 augmentation of Zhang et al. 2022)."""
    b, c, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = ox[:, None] + torch.arange(w, device=x.device)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


def _as_x(data: Any, name: str) -> torch.Tensor:
    x = getattr(data, "x", None)
    if x is None and isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor):
        x = data[0]
    if x is None:
        x = data
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty tensor (N, ...), an (x, y) tuple or a DataSplit; got "
                         f"{getattr(x, 'shape', type(x).__name__)}.")
    return x


# -- distributed set-up ------------------------------------------------------------------------------------------

def _distributed(mode: Any, device: Any) -> tuple[int, int, int]:
    """(world_size, rank, local_rank): join (or create, once per process) the process group that torchrun
    describes in the environment."""
    if mode not in ("auto", True, False):
        raise ValueError(f"distributed must be 'auto', True or False; got {mode!r}.")
    if mode is False:
        return 1, 0, 0
    import torch.distributed as dist

    if not dist.is_available():
        if mode is True:
            raise RuntimeError("distributed=True but torch.distributed is not available in this torch build.")
        return 1, 0, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank(), local_rank
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and mode == "auto":
        return 1, 0, 0
    if "MASTER_ADDR" not in os.environ:
        raise RuntimeError("distributed training needs the torchrun environment (MASTER_ADDR, MASTER_PORT, RANK, "
                           "WORLD_SIZE); launch with `torchrun --nproc_per_node=N ...`.")
    wants_cuda = torch.cuda.is_available() and str(device) != "cpu"
    dist.init_process_group("nccl" if wants_cuda else "gloo")
    # kept for later calls in the same job (re-creating a group after destroying it can hang); torn down at exit
    import atexit

    atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
    return dist.get_world_size(), dist.get_rank(), local_rank


# -- monitoring ---------------------------------------------------------------------------------------------------

def evaluate(model: Any, data: Any, *, iw_samples: int = 0, mutual_information: bool = True,
             batch_size: int = 256, seed: int = 0, max_points: int | None = None) -> dict[str, Any]:
    """Test-set monitoring through the library's estimators, as a flat dict of floats: one pass over ``data``.

    One :func:`~latentdiag.estimators.fold.fold` (each batch encoded once, draws keyed by datapoint with ``seed``)
    of the accumulators of :func:`latentdiag.elbo`, :func:`latentdiag.iw_nll` (when ``iw_samples`` > 0) and
    :func:`latentdiag.encode` (when ``mutual_information``) gives: ``test_rate``, ``test_distortion`` and
    ``test_neg_elbo_bpd`` from the ELBO (one sample per datapoint, so R + D = -ELBO exactly), the bits/dim a ratio
    of sums, sum_n (R_n + D_n) / (ln 2 sum_n d_n) (d_n = ``num_dims``: tokens for text, so bits per token),
    ``test_iw_nll`` and its bits/dim (and perplexity for text) (K = ``iw_samples``), ``test_bpd`` = the tighter
    of the two bounds computed (IW when available) with ``test_bpd_bound`` naming it, and the index-code MI
    ``test_mi`` (:func:`latentdiag.aggregate_posterior` over the encoded table, the bracket's lower end, flagged
    ``test_mi_saturated`` within 1 nat of log N), with the upper end ``test_mi_upper`` and the marginal-KL bracket
    ``test_marginal_kl_lower`` .. ``test_marginal_kl_upper``. Each number is its public function's with this
    ``seed`` (and the batch size). Under an initialised ``torch.distributed`` group every rank must call it (the
    pass is sharded; every rank gets the same dict).
    """
    from latentdiag.estimators.aggregate import aggregate_posterior

    x = _as_x(data, "data")
    if max_points is not None:
        x = x[:check_int("max_points", max_points, minimum=2)]
    iw_samples = check_int("iw_samples", iw_samples, minimum=0)
    accs = _monitor_pass(model, x, iw_samples, mutual_information, batch_size, seed)
    e = accs["elbo"].compute()  # rate, distortion and -ELBO on the same samples
    n = int(e.n)
    per_dim = _bits_per_dim(model, x, -e.per_datapoint, e.extra, "negative_elbo_")
    out: dict[str, Any] = {
        "test_rate": e.extra["rate"], "test_rate_stderr": e.extra["rate_stderr"],
        "test_distortion": e.extra["distortion"], "test_distortion_stderr": e.extra["distortion_stderr"],
        "test_neg_elbo_bpd": per_dim[0], "test_neg_elbo_bpd_stderr": per_dim[1], "test_n": n,
    }
    out["test_bpd"], out["test_bpd_stderr"], out["test_bpd_bound"] = (out["test_neg_elbo_bpd"],
                                                                      out["test_neg_elbo_bpd_stderr"], "-ELBO")
    if iw_samples:
        nll = accs["iw_nll"].compute()
        out["test_iw_nll"], out["test_iw_nll_stderr"] = nll.value, nll.stderr
        out["test_bpd"], out["test_bpd_stderr"] = _bits_per_dim(model, x, nll.per_datapoint, nll.extra, "")
        out["test_bpd_bound"] = f"IW k={iw_samples}"
        if "perplexity" in nll.extra:
            out["test_perplexity"] = nll.extra["perplexity"]
    if mutual_information:
        try:
            table = accs["table"].compute()
            with torch.no_grad():  # a learned prior's log_prob would otherwise carry gradients
                agg = aggregate_posterior(table, decompose=False, convergence=False,
                                          seed=child_seed(seed, "monitor.aggregate"))
        # a prior the aggregate-posterior estimator cannot evaluate, or a table the sharded pass could not gather
        except NotImplementedError as err:
            out.update({"test_mi": math.nan, "test_mi_stderr": math.nan, "test_mi_saturated": False,
                        "test_log_n": math.log(n),
                        "test_mi_error": f"aggregate_posterior failed: {type(err).__name__}: {err}"})
            return out
        mi = agg.mutual_information
        out["test_mi"], out["test_mi_stderr"] = mi.value, mi.stderr
        out["test_mi_saturated"] = "saturated" in mi.flags
        out["test_mi_upper"] = agg.mutual_information_upper.value          # the other end of the MI bracket
        out["test_marginal_kl_lower"] = agg.marginal_kl_lower.value
        out["test_marginal_kl_upper"] = agg.marginal_kl.value
        out["test_log_n"] = mi.extra["log_n"]
    return out


def _monitor_pass(model: Any, x: torch.Tensor, iw_samples: int, mutual_information: bool, batch_size: int,
                  seed: int) -> dict[str, Any]:
    """Fold the monitoring's accumulators over ``x`` in one pass: ``{"elbo", "iw_nll"?, "table"?}``. A table the
    fold cannot gather (a posterior family kept as Python objects, under DDP) raises NotImplementedError on
    ``compute()``; the likelihood numbers are monitored all the same."""
    from latentdiag.estimators.encoded import EncodeAccumulator
    from latentdiag.estimators.fold import batch_size_for_world, fold
    from latentdiag.estimators.likelihood import ElboAccumulator, IwNllAccumulator

    accs: dict[str, Any] = {"elbo": ElboAccumulator(samples=1)}
    if iw_samples:
        accs["iw_nll"] = IwNllAccumulator(k=iw_samples)
    if mutual_information:
        accs["table"] = EncodeAccumulator()
    fold(model, x, list(accs.values()), batch_size=batch_size_for_world(x, batch_size), seed=seed, desc="monitor")
    return accs


def _share_buffers(model: nn.Module) -> None:
    """Under DDP, give every rank rank 0's buffers (BatchNorm running statistics) before monitoring: without
    SyncBatchNorm each rank's statistics follow its own shard, and the sharded monitoring pass needs one model on
    every rank. DDP copies rank 0's buffers at the start of its next forward anyway, so training is unchanged."""
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


# -- the trainer ---------------------------------------------------------------------------------------------------

def train(model: nn.Module | Mapping[str, Any] | None, train_data: Any, *, epochs: int,
          test_data: Any = None, objective: str | Mapping[str, Any] | Objective | None = None,
          batch_size: int | None = None, lr: float | None = None, seed: int | None = None,
          device: Any = "auto", amp: bool | str = "auto", amp_dtype: str | None = None, augment: str | None = None,
          checkpoint: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          data_info: Mapping[str, Any] | None = None, monitor_every: int = 1, iw_samples: int = 0,
          mutual_information: bool = True, monitor_batch_size: int = 256, max_monitor: int | None = None,
          sync_batchnorm: bool = True, distributed: bool | str = "auto", progress: bool = False,
          clip_norm: float | None = None,
          callback: Callable[[dict[str, Any]], None] | None = None,
          hooks: Sequence[Callable[[nn.Module, int], Mapping[str, Any] | None]] = ()) -> TrainResult:
    """Train a VAE with Adam on an objective; monitor, checkpoint and resume.

    Parameters
    ----------
    model : nn.Module, mapping or None
        A model built with :func:`latentdiag.models.build_model` (needed for checkpoints), or its configuration
        ``{"name": ..., "kwargs": {...}}`` (built here with ``seed``), or None when resuming (the checkpoint's).
    train_data : tensor (N, ...), (x, y) or DataSplit
        Training data in the model's data convention (levels for categorical / logistic likelihoods).
    epochs : int
        Total number of epochs; a resumed run continues up to this number.
    test_data : data, optional
        Monitored after every ``monitor_every`` epochs (see :func:`evaluate`).
    objective : str, mapping or Objective
        Default ``"elbo"``; e.g. ``{"name": "free_bits", "free_bits": 0.1}`` (:mod:`latentdiag.train.objectives`).
    batch_size : int
        Global batch size B (default 100, the paper's); under DDP split across processes.
    lr : float
        Adam learning rate (default 3e-4, the paper's).
    seed : int
        Seeds the model initialisation (for a configuration), the data order and augmentation, and the
        reparameterisation noise (default 0). The same seed gives the same run.
    device : str or torch.device
        ``"auto"``: CUDA when available (``cuda:LOCAL_RANK`` under torchrun), else CPU.
    amp : bool or "auto"
        Mixed precision (``torch.autocast``) for the networks; ``"auto"`` enables it on CUDA for models that
        declare ``amp_safe = True`` (the LPVAE family, whose likelihood reduction runs in float32). CPU: off.
    amp_dtype : {"bfloat16", "float16"}
        Autocast dtype (default bfloat16; float16 adds a gradient scaler).
    augment : {"none", "flip_crop"}
        Training-data augmentation (``"flip_crop"``: :func:`flip_crop`, for CIFAR-10).
    checkpoint : path, optional
        Written (atomically) after every epoch with :func:`latentdiag.models.save_checkpoint`: the weights, the
        model configuration, ``data_info`` and the training state (epoch, step, optimiser, gradient scaler,
        objective state, generator states, history, settings). Loadable weights-only.
    resume : path, optional
        Continue the run recorded in this checkpoint up to ``epochs``: the same batches, noise and optimiser
        state as if it had not stopped (bit-identical on CPU). Recorded settings win; passing a different
        ``batch_size``, ``lr``, ``seed``, ``objective`` or ``augment`` raises a ValueError.
    data_info : mapping, optional
        What the data are, e.g. ``{"name": "mnist5k", "format": "levels"}`` (recorded in the checkpoint).
    monitor_every, iw_samples, mutual_information, monitor_batch_size, max_monitor
        Monitoring cadence and options (:func:`evaluate`); the last epoch is always monitored.
    sync_batchnorm : bool
        Under DDP on CUDA, convert BatchNorm layers to SyncBatchNorm so that batch statistics are those of the
        global batch (gloo on CPU cannot: there each process normalises its shard, and a note says so).
    distributed : "auto", True or False
        ``"auto"``: join the process group when launched by torchrun (WORLD_SIZE > 1) or when one is initialised.
    progress : bool
        A progress bar over batches (rank 0).
    clip_norm : float, optional
        Clip the gradient norm to this value before each step (None: no clipping; text models train more stably
        with 1.0). Recorded in the settings; a resumed run keeps it.
    callback : callable, optional
        Called on rank 0 with each epoch's record.
    hooks : sequence of callables
        Each called as ``hook(model, epoch)`` after the epoch's monitoring (for example a
        ``latentdiag.report.callback.MetricsCallback``); the numbers of a returned mapping join the epoch's record.
        Under DDP on every rank, like the monitoring, so that a hook evaluating with latentdiag's estimators
        shards its pass over the processes (every rank must reach the same collectives); a hook that writes files
        should do so on rank 0 only (``torch.distributed.get_rank() == 0``).
    """
    from latentdiag.adapters.loading import load_checkpoint
    from latentdiag.models.checkpoint import load_reference_checkpoint, save_checkpoint
    from latentdiag.models.registry import build_model, model_config

    epochs = check_int("epochs", epochs)
    monitor_every = check_int("monitor_every", monitor_every)
    iw_samples = check_int("iw_samples", iw_samples, minimum=0)
    x_train = _as_x(train_data, "train_data")
    x_test = _as_x(test_data, "test_data") if test_data is not None else None

    state: Mapping[str, Any] | None = None
    recorded: dict[str, Any] = {}
    if resume is not None:
        raw = load_checkpoint(resume, map_location="cpu")
        ref = load_reference_checkpoint(raw)
        state = ref.training
        if not state or "optimizer" not in state:
            raise ValueError(f"resume: {os.fspath(resume)!r} holds no training state to resume from.")
        recorded = dict(state["settings"])
        if model is not None:
            given = model if isinstance(model, Mapping) else model_config(model)
            if given is not None and dict(given) != ref.config:
                raise ValueError(f"resume: the model {dict(given)} differs from the checkpoint's {ref.config}.")
        data_info = data_info if data_info is not None else ref.data
        for name, value in (("batch_size", batch_size), ("lr", lr), ("seed", seed), ("augment", augment)):
            if value is not None and value != recorded[name]:
                raise ValueError(f"resume continues the recorded run: {name} was {recorded[name]!r}; got {value!r}.")
        if objective is not None and objective_from_config(objective).config() != recorded["objective"]:
            raise ValueError(f"resume continues the recorded run: objective was {recorded['objective']}; got "
                             f"{objective_from_config(objective).config()}.")
        batch_size, lr, seed, augment = (recorded["batch_size"], recorded["lr"], recorded["seed"],
                                         recorded["augment"])
        clip_norm = recorded.get("clip_norm", clip_norm)
        objective = recorded["objective"]
        amp_dtype = amp_dtype or recorded.get("amp_dtype")
        model = ref.model
    elif model is None:
        raise ValueError("model is required unless resuming (resume=path).")

    batch_size = check_int("batch_size", batch_size if batch_size is not None else 100)
    lr = check_positive_float("lr", lr if lr is not None else 3e-4)
    seed = check_int("seed", seed if seed is not None else 0, minimum=0)
    augment = check_choice("augment", augment if augment is not None else "none", AUGMENTATIONS)
    if clip_norm is not None:
        clip_norm = check_positive_float("clip_norm", clip_norm)
    amp_dtype = check_choice("amp_dtype", amp_dtype or "bfloat16", AMP_DTYPES)
    obj = objective_from_config(objective if objective is not None else "elbo")
    if state is not None:
        obj.load_state_dict(state["objective"]["state"])

    world, rank, local_rank = _distributed(distributed, device)
    if world > 1 and (device == "auto" or str(device) == "cuda") and torch.cuda.is_available():
        run_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(run_device)
    else:
        run_device = resolve_device(device)
    if isinstance(model, Mapping):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stream_seed(seed, "train.init"))
            model = build_model(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a configuration mapping; got {type(model).__name__}.")
    if checkpoint is not None and model_config(model) is None:
        raise ValueError("checkpoint needs a model built with latentdiag.models.build_model (so that it can be "
                         "rebuilt); pass the configuration mapping instead of the module.")
    use_amp = _amp(amp, run_device, model)
    notes: list[str] = []
    model.to(run_device)
    if world > 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        if run_device.type == "cuda" and sync_batchnorm:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            notes.append("BatchNorm under DDP without SyncBatchNorm: each process normalises its own shard, so "
                         "training differs from one process on the global batch")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == "float16" else None
    data_gen, noise_gen = torch.Generator(), torch.Generator()
    history: list[dict[str, Any]] = []
    start_epoch, step = 0, 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        data_gen.set_state(state["rng"]["data"])
        noise_gen.set_state(state["rng"]["noise"])
        history = [dict(h) for h in state["history"]]
        start_epoch, step = int(state["epoch"]), int(state["step"])
    else:
        data_gen.manual_seed(stream_seed(seed, "train.data_order"))
        noise_gen.manual_seed(stream_seed(seed, "train.noise"))
    settings = {"batch_size": batch_size, "lr": lr, "seed": seed, "augment": augment, "objective": obj.config(),
                "amp": use_amp, "amp_dtype": amp_dtype if use_amp else None, "device": str(run_device),
                "world_size": world, "epochs": epochs, "iw_samples": iw_samples,
                "monitor_every": monitor_every, "max_monitor": max_monitor, "clip_norm": clip_norm}
    latent_dim = _latent_dim(model, x_train)
    step_module: nn.Module = _Step(model)
    sync: Sync = Sync()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        step_module = DistributedDataParallel(step_module, device_ids=[local_rank]
                                              if run_device.type == "cuda" else None)
        sync = _DistSync(world, rank)
    cuda_devices = [run_device.index if run_device.index is not None else torch.cuda.current_device()] \
        if run_device.type == "cuda" else []
    ckpt_path = Path(checkpoint) if checkpoint is not None else None

    with torch.random.fork_rng(devices=cuda_devices):
        if state is not None:
            torch.set_rng_state(state["rng"]["torch"])
        else:
            torch.manual_seed(stream_seed(seed, "train.torch_global"))
        for epoch in range(start_epoch + 1, epochs + 1):
            t0 = time.perf_counter()
            record, step = _epoch(step_module, model, obj, opt, scaler, x_train, batch_size, augment, data_gen,
                                  noise_gen, latent_dim, sync, world, rank, step, run_device, use_amp,
                                  amp_dtype, progress and rank == 0, epoch, epochs, clip_norm)
            if run_device.type == "cuda":
                torch.cuda.synchronize(run_device)
            seconds = time.perf_counter() - t0
            record.update({"seconds": seconds, "images_per_s": record.pop("_images") / seconds})
            if x_test is not None and (epoch % monitor_every == 0 or epoch == epochs):
                if world > 1:  # every rank monitors its shard of the test set (same numbers on every rank)
                    _share_buffers(model)
                record.update(evaluate(model, x_test, iw_samples=iw_samples,
                                       mutual_information=mutual_information, batch_size=monitor_batch_size,
                                       seed=seed, max_points=max_monitor))
            for hook in hooks:  # on every rank: a hook that folds (MetricsCallback) shards its pass too
                extra = hook(model, epoch)
                record.update({k: v for k, v in (extra or {}).items() if k not in record})
            history.append(record)
            if rank == 0 and ckpt_path is not None:
                training = {"epoch": epoch, "step": step, "optimizer": opt.state_dict(),
                            "scaler": scaler.state_dict() if scaler is not None else None,
                            "objective": {"config": obj.config(), "state": obj.state_dict()},
                            "history": history, "settings": settings,
                            "rng": {"data": data_gen.get_state(), "noise": noise_gen.get_state(),
                                    "torch": torch.get_rng_state()}}
                save_checkpoint(ckpt_path, model, data=data_info, training=training)
            if rank == 0 and callback is not None:
                callback(dict(record))
            if world > 1:
                import torch.distributed as dist

                dist.barrier()
    model.eval()
    return TrainResult(model=model, history=history, checkpoint=ckpt_path, settings=settings, notes=tuple(notes))


def _bits_per_dim(model: Any, x: torch.Tensor, nll: Any, extra: Mapping[str, float], prefix: str
                  ) -> tuple[float, float]:
    """Bits per dimension (per token for text) of per-datapoint NLLs as a ratio of sums, sum nll / (ln 2 sum d),
    from an estimate's extras when the model offers ``num_dims``, else with d = the elements of one datapoint."""
    if f"{prefix}bits_per_dim" in extra:
        return extra[f"{prefix}bits_per_dim"], extra[f"{prefix}bits_per_dim_stderr"]
    import numpy as np

    from latentdiag.estimators._common import per_dim_extras

    dims = np.full(len(nll), float(x[0].numel()))
    got = per_dim_extras(np.asarray(nll, dtype=float), dims)
    return got["bits_per_dim"], got["bits_per_dim_stderr"]


def _dims_total(model: Any, x: torch.Tensor) -> float:
    """The number of observed dimensions (tokens for text) of the rows of ``x``: sum of ``num_dims`` per row."""
    from latentdiag.estimators._common import with_num_dims

    dims = with_num_dims(model, x, {}).get("dims")
    return float(dims.sum()) if dims is not None else float(x[0].numel() * x.shape[0])


def _amp(amp: Any, device: torch.device, model: nn.Module) -> bool:
    if amp == "auto":
        return device.type == "cuda" and bool(getattr(model, "amp_safe", False))
    if not isinstance(amp, bool):
        raise ValueError(f"amp must be True, False or 'auto'; got {amp!r}.")
    if amp and device.type != "cuda":
        raise ValueError(f"amp=True needs a CUDA device; training runs on {device}.")
    return amp


def _latent_dim(model: nn.Module, x: torch.Tensor) -> int:
    device = next(iter(model.parameters())).device
    with evaluation(model):
        q = model.encode(x[:2].to(device))
    if len(q.event_shape) != 1:
        raise ValueError(f"model.encode(x) must have event_shape (D,); got {tuple(q.event_shape)}.")
    return int(q.event_shape[0])


def _shards(size: int, world: int) -> list[int]:
    return [size // world + (1 if r < size % world else 0) for r in range(world)]


def _epoch(step_module, model, obj, opt, scaler, x_train, batch_size, augment, data_gen, noise_gen, latent_dim,
           sync, world, rank, step, device, use_amp, amp_dtype, progress, epoch, epochs, clip_norm=None):
    from tqdm.auto import tqdm

    model.train()
    n = x_train.shape[0]
    order = torch.randperm(n, generator=data_gen)
    if batch_size < 2 * world:
        raise ValueError(f"batch_size must be at least 2 per process; got {batch_size} for {world} process(es).")
    batches = [idx for idx in order.split(batch_size) if idx.numel() == batch_size]  # drop a ragged last batch
    sums: dict[str, float] = {}
    seen, dims_seen = 0, 0.0
    autocast_dtype = torch.bfloat16 if amp_dtype == "bfloat16" else torch.float16
    for idx in tqdm(batches, desc=f"epoch {epoch}/{epochs}", unit="batch", disable=not progress, leave=False):
        xb = x_train[idx]
        if augment == "flip_crop":
            xb = flip_crop(xb, data_gen)
        size = xb.shape[0]
        sizes = _shards(size, world)
        start = sum(sizes[:rank])
        eps = torch.randn(size, latent_dim, generator=noise_gen)
        prior_eps = torch.randn(size, latent_dim, generator=noise_gen) if obj.needs_prior_samples else None
        x_local = xb[start:start + sizes[rank]].to(device, non_blocking=True)
        eps_local = eps[start:start + sizes[rank]].to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=use_amp):
            ll, kl, kl_dims, z = step_module(x_local, eps_local)
        terms = BatchTerms(log_likelihood=ll, kl=kl, kl_per_dim=kl_dims, z=z, global_size=size, shard_sizes=sizes,
                           sync=sync, prior_sample=_prior_sampler(model, prior_eps, device))
        out = obj(terms, step)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(out.backward).backward()
            if clip_norm is not None:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            scaler.step(opt)
            scaler.update()
        else:
            out.backward.backward()
            if clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            opt.step()
        obj.after_step(out)
        step += 1
        seen += size
        dims_seen += _dims_total(model, xb)
        for key, value in (("train_loss", out.value), ("train_neg_elbo", out.neg_elbo), ("train_rate", out.rate),
                           ("train_distortion", out.distortion), *out.extras.items()):
            sums[key] = sums.get(key, 0.0) + value * size
    if not seen:
        raise ValueError(f"no training batch: {n} datapoints is fewer than batch_size={batch_size}.")
    record: dict[str, Any] = {"epoch": epoch, "step": step}
    record.update({k: v / seen for k, v in sums.items()})
    # a ratio of sums over the epoch's rows (total nats / total tokens), never one datapoint's length
    record["train_bpd"] = sums["train_neg_elbo"] / (dims_seen * _LN2)
    record["_images"] = seen
    return record, step


def _prior_sampler(model: nn.Module, eps: torch.Tensor | None, device: torch.device):
    """Samples of p(z) for the global batch from pre-drawn N(0, I) noise (the same on every process)."""
    if eps is None:
        return None

    def draw(count: int) -> torch.Tensor:
        p = model.prior()
        u = eps[:count].to(device)
        with torch.no_grad():
            if is_diagonal_normal(p):
                loc, scale = diagonal_marginals(p)
                return loc + scale * u.to(loc)
            base = getattr(p, "base_dist", None)
            if base is not None and is_diagonal_normal(base):
                loc, scale = diagonal_marginals(base)
                z = loc + scale * u.to(loc)
                for t in p.transforms:
                    z = t(z)
                return z
            return p.sample((count,))

    return draw


# -- bundled data and the reference models, for the command line ---------------------------------------------

def load_training_data(data: str = "mnist5k", *, likelihood: str = "categorical",
                       data_dir: str | os.PathLike | None = None, vocab: Any = None) -> dict[str, Any]:
    """Train and test splits in the data convention of a likelihood, with what the model needs to know.

    Text (``"topics"``, ``"text:FILE"``, ``"text:TRAIN,TEST"``; see :func:`latentdiag.data.load_spec`) comes as
    token-id splits with the training vocabulary (or ``vocab``, e.g. a resumed model's), ``"text": True``.

    Returns ``{"train", "test", "info", "input_shape", "levels", "augment"}``: ``"mnist5k"`` and ``"digits"``
    (bundled) as grey levels (``format="levels"``, stored as uint8; 256 and 17 levels) or binarised
    (``format="binary"``, for the Bernoulli likelihood), ``"mnist:DIR"`` (full MNIST from a folder of IDX files,
    :func:`latentdiag.data.read_mnist`), ``"cifar10"`` read from ``data_dir`` (or ``"cifar10:DIR"``) with
    :func:`latentdiag.data.read_cifar10` (levels, with the flip-and-crop augmentation at training time only).
    """
    from latentdiag.data import DataSplit, digits, mnist5k, read_cifar10

    if isinstance(data, str) and (data == "topics" or data.startswith("text:")):
        from latentdiag.data.spec import load_spec

        train_split, test_split = (load_spec(data, s, vocab=vocab) for s in ("train", "test"))
        if vocab is None and data == "topics":
            vocab = train_split.vocab
        return {"train": train_split, "test": test_split, "text": True, "augment": "none",
                "info": {"name": data, "format": None, "kind": "text", "vocabulary": len(train_split.vocab),
                         "train_sentences": len(train_split), "test_sentences": len(test_split)}}
    spec = data
    if isinstance(data, str) and data.startswith("cifar10:"):  # the spec form of "cifar10" with data_dir
        if not data[len("cifar10:"):]:
            raise ValueError("data='cifar10:DIR' needs the folder holding cifar-10-batches-py after 'cifar10:'.")
        data, data_dir = "cifar10", data[len("cifar10:"):]
    mnist_dir = data[len("mnist:"):] if isinstance(data, str) and data.startswith("mnist:") else None
    if mnist_dir is None:
        data = check_choice("data", data, ("mnist5k", "digits", "cifar10", "cifar10:DIR", "mnist:DIR", "topics",
                                           "text:PATH"))
    fmt = "binary" if likelihood == "bernoulli" else "levels"
    if mnist_dir is not None:  # full MNIST from the user's IDX files (60,000 / 10,000)
        from latentdiag.data import read_mnist

        if not mnist_dir:
            raise ValueError("data='mnist:DIR' needs the folder of the MNIST IDX files after 'mnist:'.")
        train_split, test_split = (read_mnist(mnist_dir, s, format=fmt) for s in ("train", "test"))
        shape, levels, aug = list(train_split.x.shape[1:]), 256, "none"
    elif data == "cifar10":
        if data_dir is None:
            raise ValueError("data='cifar10' needs data_dir, the folder holding cifar-10-batches-py.")
        train_split, test_split = (read_cifar10(data_dir, s, format=fmt) for s in ("train", "test"))
        shape, levels, aug = [3, 32, 32], 256, "flip_crop"
    else:
        loader = mnist5k if data == "mnist5k" else digits
        train_split, test_split = loader("train", format=fmt), loader("test", format=fmt)
        shape, levels, aug = list(train_split.x.shape[1:]), (256 if data == "mnist5k" else 17), "none"
    if fmt == "levels":  # 8-bit levels kept as uint8: 8 times less memory than int64 (CIFAR-10: 150 MB)
        train_split, test_split = (DataSplit(s.x.to(torch.uint8), s.y, s.name, s.num_classes)
                                   for s in (train_split, test_split))
    return {"train": train_split, "test": test_split, "info": {"name": spec, "format": fmt},
            "input_shape": shape, "levels": levels, "augment": aug}


def train_reference(model: str = "lpvae_mnist", *, horizon: int | str = 1, latent_dim: int | None = None,
                    likelihood: str | None = None, prior: str = "normal", flow_steps: int | None = None,
                    model_options: Mapping[str, Any] | None = None, data: str | None = None,
                    data_dir: str | os.PathLike | None = None, objective: str | Mapping[str, Any] | None = None,
                    epochs: int | None = 10, batch_size: int | None = None, lr: float | None = None,
                    seed: int | None = None, device: Any = "auto", amp: bool | str = "auto",
                    out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
                    iw_samples: int = 0, max_monitor: int | None = None, progress: bool = False,
                    callback: Callable[[dict[str, Any]], None] | None = None,
                    labels: int | None = None) -> TrainResult:
    """Train a reference model (what ``latentdiag train`` runs): an LPVAE / FPVAE on bundled or CIFAR-10 images, or
    the Transformer VAE (``model="transformer_vae"``) on text (``data="topics"``, the default for it, or
    ``"text:FILE"`` / ``"text:TRAIN,TEST"``).

    Images: builds ``reference_config(model, horizon=..., ...)`` with the data's image shape and number of levels.
    Text: builds the registry configuration of a :class:`~latentdiag.models.TransformerVAE` for the training
    vocabulary (recorded in the checkpoint as a plain token list), ``model_options`` being its keyword arguments
    (``d_model``, ``heads``, ``ff_dim``, ``encoder_layers``, ``decoder_layers``, ``max_len``,
    ``embedding_injection``, ``memory_injection``, ``word_dropout``, ``dropout``); text defaults are batch size 64,
    learning rate 1e-3 and gradient clipping at norm 1.0. Loads the data (:func:`load_training_data`) and calls
    :func:`train` with checkpoints to ``out``. When resuming, the model and the data come from the checkpoint
    (``data`` may be omitted).

    Semi-supervised (``model="m2_lpvae"``, ``labels`` = the size of the labelled subset):
    :func:`latentdiag.train.semi_supervised.train_reference_semi_supervised` (``epochs`` None: its default).
    """
    from latentdiag.models.lpvae import reference_config
    from latentdiag.models.transformer_vae import text_vae_config
    from latentdiag.train import semi_supervised as ssl

    if resume is None and (model in ssl.SEMI_SUPERVISED_MODELS or labels is not None):  # issue 20: M2
        return ssl.train_reference_semi_supervised(
            model, labels=labels, horizon=horizon, latent_dim=latent_dim, likelihood=likelihood,
            model_options=model_options, data=data, data_dir=data_dir, objective=objective, epochs=epochs,
            batch_size=batch_size, lr=lr, seed=seed, device=device, out=out, callback=callback)
    epochs = 10 if epochs is None else epochs
    if resume is not None:
        from latentdiag.adapters.loading import load_checkpoint

        raw = load_checkpoint(resume, map_location="cpu")
        if not isinstance(raw, Mapping):
            raise ValueError(f"resume: {os.fspath(resume)!r} is not a latentdiag reference checkpoint.")
        ssl.refuse_resume(raw, labels)  # issue 20: a semi-supervised run is not resumed (yet)
        recorded = raw.get("data") or {}
        kwargs = (raw.get("model") or {}).get("kwargs", {})
        name = data or recorded.get("name")
        if name is None:
            raise ValueError("resume: the checkpoint records no data set; pass data=...")
        vocab = None
        if (raw.get("model") or {}).get("name") == "transformer_vae":
            from latentdiag.data.text import SPECIALS, Vocabulary

            tokens = list(kwargs.get("vocab", []))
            vocab = Vocabulary(tokens[len(SPECIALS):], lowercase=kwargs.get("lowercase", True))
        loaded = load_training_data(name, likelihood=kwargs.get("likelihood", "categorical"), data_dir=data_dir,
                                    vocab=vocab)
        config = None
    elif model == "transformer_vae":
        loaded = load_training_data(data or "topics")
        options = dict(model_options or {})
        options.setdefault("max_len", max(64, int(loaded["train"].x.shape[1]), int(loaded["test"].x.shape[1])))
        config = text_vae_config(loaded["train"].vocab, latent_dim=latent_dim, **options)
        batch_size, lr = batch_size or 64, lr or 1e-3
    else:
        name = data or ("cifar10" if model == "lpvae_cifar" else "mnist5k")
        likelihood = likelihood or ("logistic_mixture" if model == "lpvae_cifar" else "categorical")
        loaded = load_training_data(name, likelihood=likelihood, data_dir=data_dir)
        config = reference_config(model, horizon=horizon, latent_dim=latent_dim, likelihood=likelihood, prior=prior,
                                  flow_steps=flow_steps, input_shape=loaded["input_shape"], levels=loaded["levels"],
                                  **dict(model_options or {}))
    augment = loaded["augment"] if resume is None and loaded["augment"] != "none" else None
    clip = 1.0 if resume is None and loaded.get("text") else None
    return train(config, loaded["train"], test_data=loaded["test"], epochs=epochs, objective=objective,
                 batch_size=batch_size, lr=lr, seed=seed, device=device, amp=amp, augment=augment, checkpoint=out,
                 resume=resume, data_info=loaded["info"], iw_samples=iw_samples, max_monitor=max_monitor,
                 progress=progress, callback=callback, clip_norm=clip)
