"""Scale-out over torch.distributed ranks: the bank split (exact merge) and the seed split.

Launch. `torchrun --nproc-per-node N --no-python scorefield -- COMMAND ...` (the `--` keeps torchrun from reading
the command's options: `--n` would be an abbreviation of its `--nnodes`) sets RANK, WORLD_SIZE and LOCAL_RANK;
`init()` then joins the process group (gloo on the CPU, NCCL when CUDA is available, rank r on GPU LOCAL_RANK).
Without those variables nothing here does anything: every helper is the identity of one process.

Two ways to split the work:

- **Bank split** (`shard_bank`): every rank holds a contiguous shard of the training images and answers the
  same queries against its shard only. The engine's streaming log-sum-exp states over disjoint keys merge
  exactly (kamb-ganguli eq. 10 / 40 is a softmax over the bank, and a softmax over a union of key sets is the
  merge of the partial ones):  m = max_r m_r,  l = Σ_r l_r·e^{m_r − m},  acc = Σ_r acc_r·e^{m_r − m},
  x̂₀ = acc / l  (`all_reduce_state`: an all-reduce MAX, then an all-reduce SUM). Each rank first replaces the
  float32 contributions of its own top keys by exact float64 ones (`exact_topk_correction`), so the global top
  keys, each in some rank's local top set, are exact after the merge, and the merge itself runs in float64.
  The bank split takes the GEMM route (no cluster pruning, no box sums): the result equals the single-process
  GEMM route to float rounding. The flat first step's prior mean is merged the same way.
- **Seed split** (`split`, `run_units`): seeds (or whole batches of them) are independent, so each rank computes
  its part and rank 0 gathers the results in seed order and writes them. A unit of work (a sample batch, a
  calibration step, a theory's samples) is written by rank 0 as soon as it is complete, so a run killed on any
  rank (torchrun then stops the others) resumes, under any number of ranks, from its files and loses no written
  unit; only the units of the round in flight are computed again.

Rank 0 owns the run directory (`shared_run`: it creates or reopens and locks it; the other ranks only learn its
path) and writes every file; the other ranks never write there, and what they need to know of it (which units
are done, a resumed run's config) rank 0 reads and broadcasts.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from .engine import kernels
from .engine.banks import WholeImages
from .engine.errors import PatchConfigError
from .engine.flat import FLAT_LOGIT_SPREAD, flat_logit_spread
from .engine.gemm_route import group_queries, scatter_groups
from .engine.geometry import check_patch_size, extract_patches
from .engine.patch_posterior import PatchPosterior, check_patch_fits
from .engine.posterior import DEFAULT_MEMORY_BUDGET, DEFAULT_TOPK, noise_coefficients, softmax_posterior
from .engine.softmax import SoftmaxState

Tensor = torch.Tensor
T = TypeVar("T")
R = TypeVar("R")

SHARDS = ("seeds", "bank")              # what `--shard` splits over the ranks
SPLITS = ("contiguous", "strided")      # how a list of seeds is dealt to the ranks
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE")
# How long a rank waits in a collective (torch's default: 30 min). Under the seed split a rank waits for the
# others' units, which can be whole network trainings (compare-processes, guidance-pulses); a rank that dies
# stops the job through torchrun anyway. Seconds, from the environment variable TIMEOUT_VARIABLE if set.
TIMEOUT_VARIABLE = "SCOREFIELD_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 6 * 3600


class DistributedError(ValueError):
    """A scale-out request that cannot run (no process group, more ranks than work, an unsplittable model)."""


# ---- the process group ---------------------------------------------------------------------------------------

def launched() -> bool:
    """Whether this process was started by torchrun (RANK and WORLD_SIZE are set)."""
    return all(v in os.environ for v in LAUNCH_VARIABLES)


def init(backend: str | None = None) -> bool:
    """Join the process group when launched by torchrun (idempotent); returns whether one is active.
    backend: 'gloo' or 'nccl' (default: NCCL when CUDA is available, else gloo)."""
    if not launched():
        return active()
    if not tdist.is_available():
        raise DistributedError("torchrun started this process but this torch build has no torch.distributed")
    if not tdist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        tdist.init_process_group(backend, timeout=collective_timeout())
        atexit.register(shutdown)
    return active()


def collective_timeout() -> timedelta:
    """The process group's timeout: $SCOREFIELD_DIST_TIMEOUT seconds, else DEFAULT_TIMEOUT_S."""
    text = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= 1e9:                   # finite; timedelta overflows near 1e14 s
        raise DistributedError(f"{TIMEOUT_VARIABLE} must be a positive number of seconds, got {text!r}")
    return timedelta(seconds=seconds)


def shutdown() -> None:
    """Leave the process group (at exit; safe to call twice)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def active() -> bool:
    """Whether more than one rank shares the work."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Rank 0 writes every file of a run; the others compute only."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: its GPU under NCCL, else the CPU."""
    if active() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if active():
        tdist.barrier()


@contextmanager
def writer_only():
    """`with writer_only() as writing:` — the body runs on every rank, `writing` is True on rank 0 only, and
    all ranks wait at the end until rank 0 has written."""
    try:
        yield is_writer()
    finally:
        barrier()


# ---- splitting and gathering -----------------------------------------------------------------------------------

def split_positions(n: int, mode: str = "contiguous", rank_: int | None = None, world: int | None = None,
                    what: str = "seeds") -> list[int]:
    """The positions 0…n−1 this rank takes. contiguous: rank r takes one block, the first n mod W ranks one item
    more (rank 0 first, so gathering in rank order is seed order); strided: r, r+W, r+2W, …. Deterministic in
    (n, W, r). Refuses more ranks than items."""
    if mode not in SPLITS:
        raise DistributedError(f"split must be one of {SPLITS}, got {mode!r}")
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if n < w:
        raise DistributedError(f"{n} {what} cannot be split over {w} ranks: use at most {n} processes "
                               f"(torchrun --nproc-per-node) or more {what}")
    if mode == "strided":
        return list(range(r, n, w))
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return list(range(start, start + base + (1 if r < extra else 0)))


def split(items: Sequence[T], mode: str = "contiguous", what: str = "seeds") -> list[T]:
    """This rank's share of `items` (see `split_positions`)."""
    return [items[i] for i in split_positions(len(items), mode, what=what)]


def gather_objects(obj: T) -> list[T] | None:
    """Every rank's `obj` (picklable) on rank 0, in rank order; None on the other ranks."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_writer() else None
    tdist.gather_object(obj, out, dst=0)
    return out


def gather_in_order(local: Tensor, mode: str = "contiguous") -> Tensor | None:
    """[n, ...] on rank 0 from each rank's rows [n_r, ...] of a `split_positions(n, mode)` split, put back in
    the original (seed) order; None on the other ranks."""
    parts = gather_objects(local.detach().cpu())
    if parts is None:
        return None
    n = sum(p.shape[0] for p in parts)
    order = torch.tensor([i for r in range(len(parts)) for i in split_positions(n, mode, r, len(parts))])
    return torch.cat(parts)[torch.argsort(order)]


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj if is_writer() else None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def on_writer(fn: Callable[[], R]) -> R:
    """fn() run on rank 0 only, its result (picklable) handed to every rank; an error raised there is raised on
    every rank, so no rank waits forever for a rank that gave up."""
    if not active():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if is_writer():
        try:
            outcome = (True, fn())
        except Exception as exc:   # every rank must learn of it; re-raised below
            outcome = (False, exc)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def shared_run(open_run: Callable[[], Any]) -> Any:
    """The run directory of a job: rank 0 creates or reopens it and holds its lock (`open_run()` returns the
    locked RunDir); the other ranks get a RunDir of the same path that they never write."""
    if not active():
        return open_run()
    from .runs import RunDir

    held = None

    def make() -> str:
        nonlocal held
        held = open_run()
        return str(held.path)

    path = on_writer(make)
    return held if is_writer() else RunDir(path)


def run_units(units: Sequence[T], compute: Callable[[T], R], save: Callable[[T, R], None],
              split_work: bool = True, what: str = "units") -> None:
    """Compute each unit once and save it on rank 0, in order.

    split_work (the seed split): units are dealt in rounds of W, rank r computing unit kW + r of round k; rank 0
    saves its own result at once, then receives and saves the others' in order, so a finished unit is on disk
    before the next round starts. Without it (the bank split) every rank computes every unit together and rank
    0 saves. One process: compute, save. Fewer pending units than ranks leaves ranks idle: said once, as a
    warning naming `what`."""
    if not active():
        for unit in units:
            save(unit, compute(unit))
        return
    if not split_work:
        for unit in units:
            result = compute(unit)
            if is_writer():
                save(unit, result)
        return
    w, r = world_size(), rank()
    if 0 < len(units) < w and is_writer():
        warnings.warn(f"{len(units)} {what} to compute for {w} ranks: {w - len(units)} rank(s) stay idle "
                      f"(the seed split deals whole {what}; use smaller ones)", stacklevel=2)
    for start in range(0, len(units), w):
        group = list(units[start:start + w])
        mine = compute(group[r]) if r < len(group) else None
        if is_writer():
            save(group[0], mine)
        gathered = gather_objects(mine)
        if gathered is not None:
            for unit, result in zip(group[1:], gathered[1:len(group)], strict=True):
                save(unit, result)


def record_engine_entries(run: Any, entries: list[dict[str, Any]], **context: Any) -> int:
    """Append engine-call entries (drained from a model on any rank) to the run's engine.jsonl with `context`,
    as `engine_log.record` does for a model of this process."""
    from .experiments import engine_log
    from .runs import jsonable

    if not entries:
        return 0
    lines = "".join(json.dumps(jsonable({**context, **engine_log._compact(e)})) + "\n" for e in entries)
    with open(run.file(engine_log.LOG), "a") as fh:
        fh.write(lines)
    return len(entries)


def drain_engine_log(model: Any) -> list[dict[str, Any]]:
    """A model's engine calls since the last drain ([] for a model without an engine)."""
    from .models import Denoiser

    return model.engine_log() if isinstance(model, Denoiser) else []


# ---- the exact merge of the bank split -------------------------------------------------------------------------

def _on_comm(t: Tensor) -> Tensor:
    return t.to(device()).contiguous()


def all_reduce_state(state: SoftmaxState) -> SoftmaxState:
    """The streaming-softmax state over the union of every rank's keys (float64 recommended).

    m = max_r m_r (all-reduce MAX); each rank rescales l and acc by e^{m_r − m} (0 where it saw no key) and the
    sum is an all-reduce SUM. Top-key tracking is not merged: correct each rank's top keys before (see the
    module docstring). Shapes as in `SoftmaxState`: m, l [G..., Q]; acc [G..., Q, V]."""
    if not active():
        return state
    where = state.m.device
    m = _on_comm(state.m.clone())
    tdist.all_reduce(m, op=tdist.ReduceOp.MAX)
    m = m.to(where)
    scale = torch.where(torch.isfinite(state.m), torch.exp(state.m - m), torch.zeros_like(m))
    packed = _on_comm(torch.cat([(state.l * scale)[..., None], state.acc * scale[..., None]], -1))
    tdist.all_reduce(packed, op=tdist.ReduceOp.SUM)
    packed = packed.to(where)
    return SoftmaxState(m, packed[..., 0], packed[..., 1:])


def all_reduce_max(value: float) -> float:
    if not active():
        return value
    t = _on_comm(torch.tensor([value], dtype=torch.float64))
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return float(t[0])


def broadcast_tensor(t: Tensor) -> Tensor:
    """Rank 0's tensor on every rank (same shape and dtype everywhere): the bank split's ranks must answer the
    very same queries."""
    if not active():
        return t
    buf = _on_comm(t.detach().clone())
    tdist.broadcast(buf, src=0)
    return buf.to(t.device)


def shard_range(n: int, what: str = "training images") -> slice:
    """This rank's contiguous shard of n training images (`split_positions`, contiguous)."""
    if not active():
        raise DistributedError("the bank split (--shard bank, shard_bank) needs a torch.distributed process "
                               "group of 2 or more ranks: launch with  torchrun --nproc-per-node N --no-python "
                               "scorefield -- COMMAND ...")
    pos = split_positions(n, "contiguous", what=what)
    return slice(pos[0], pos[-1] + 1)


class ShardedPatchPosterior:
    """A `PatchPosterior` over this rank's shard of the training images whose calls answer for every rank's
    images: per group batch, the local streamed state (top keys corrected exactly) merged by
    `all_reduce_state`. GEMM route only; no provenance, no gradients. Every rank must call it together (the
    queries are taken from rank 0, so a diverged rank cannot silently answer other queries)."""

    def __init__(self, engine: PatchPosterior, max_pixel: float) -> None:
        self.engine = engine
        self.max_pixel = float(max_pixel)          # over every rank's images: the flat test must agree
        self.history: list[dict] = []
        self.last_stats: dict = {}
        self._prior: dict[tuple[int, int], Tensor] = {}

    def to(self, device: torch.device | str) -> ShardedPatchPosterior:
        self.engine.to(device)
        self._prior = {k: v.to(device) for k, v in self._prior.items()}
        return self

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.engine.image_shape

    def __call__(self, x: Tensor, alpha_bar: Tensor | float, patch_size: int,
                 return_provenance: bool = False) -> Tensor:
        """Posterior-mean image [B, C, H, W] of x [B, C, H, W] at ᾱ [B] over every rank's images."""
        if return_provenance:
            raise PatchConfigError("provenance is not available with the bank split over ranks (each rank "
                                   "knows only its shard); run without --shard bank for provenance")
        _refuse_gradients(x)
        patch_size = check_patch_size(patch_size)
        check_patch_fits(patch_size, self.image_shape)
        if tuple(x.shape[1:]) != self.image_shape:
            raise PatchConfigError(f"x has image shape {tuple(x.shape[1:])}, the bank {self.image_shape}")
        self.engine.to(x.device)
        b = x.shape[0]
        ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=x.device).reshape(-1).expand(b).contiguous()
        x, ab = broadcast_tensor(x), broadcast_tensor(ab)
        per_pass = self.engine.samples_per_pass(patch_size)
        return torch.cat([self._denoise(x[i:i + per_pass], ab[i:i + per_pass], patch_size)
                          for i in range(0, b, per_pass)])

    def _denoise(self, x: Tensor, ab: Tensor, patch_size: int) -> Tensor:
        engine = self.engine
        b, c, h, w = x.shape
        a, s2 = noise_coefficients(ab)
        queries = extract_patches(x.detach().to(engine.dtype), patch_size, engine.padding)   # [B, H·W, D]
        parts: list[tuple[Tensor, Tensor]] = []
        stats = {"patch_size": patch_size, "alpha_bar": ab.tolist(), "pairs_evaluated": 0, "pairs_total": 0,
                 "neglected_bound": 0.0, "cross_term": "gemm", "device": str(x.device),
                 "fold": "compiled" if engine.dtype == torch.float32 and x.device.type == "cpu" else "reference",
                 "bank_split": world_size()}
        for i, gb in enumerate(engine.layout(patch_size)):
            source = engine.bank(patch_size, i)
            query_locs = gb.query_locs.to(x.device)
            q, a_q, s2_q = group_queries(queries, a, s2, query_locs, gb.groups)              # [G, B·Lq, D]
            spread = flat_logit_spread(q, a_q, s2_q, self.max_pixel)
            stats["pairs_total"] += q.shape[1] * source.num_keys * gb.groups
            if spread <= FLAT_LOGIT_SPREAD:    # the same decision on every rank: same queries, global max pixel
                mean = self.prior_mean(patch_size, i)[:, None, :].expand(gb.groups, q.shape[1], -1)
                stats["neglected_bound"] = max(stats["neglected_bound"], math.expm1(2 * spread))
            else:
                chunk = None if engine.chunk_images is None else engine.chunk_images * gb.key_locs.shape[1]
                mean, _ = softmax_posterior(q, a_q, s2_q, source, dtype=engine.dtype, topk=engine.topk,
                                            memory_budget=engine.memory_budget, chunk_keys=chunk,
                                            merge=all_reduce_state)
                stats["pairs_evaluated"] += q.shape[1] * source.folded_keys * gb.groups
            parts.append((query_locs.T, mean.reshape(gb.groups, b, -1, c).permute(1, 2, 0, 3)))
        stats["fraction"] = stats["pairs_evaluated"] / max(1, stats["pairs_total"])
        self.last_stats = stats
        self.history.append(stats)
        return scatter_groups(parts, b, c, engine.dtype).transpose(1, 2).reshape(b, c, h, w).to(x.dtype)

    def prior_mean(self, patch_size: int, batch_index: int) -> Tensor:
        """[G, V] prior mean Σ_k w_k v_k / Σ_k w_k over every rank's bank: each rank's (log total weight, mean)
        as a one-key state, merged."""
        key = (patch_size, batch_index)
        if key not in self._prior:
            engine = self.engine
            if engine.grouping == "shared" and engine.padding == "circular" and not engine.valid_only:
                # every pixel of every image is the centre of one patch: image weights times mean pixels
                logw = engine.log_weights.to(torch.float64)                               # [n]
                m = logw.max()
                w = torch.exp(logw - m)
                pixel_means = engine.images.to(torch.float64).mean(dim=(2, 3))            # [n, C]
                state = SoftmaxState(m.reshape(1, 1), w.sum().reshape(1, 1), (w @ pixel_means).reshape(1, 1, -1))
            else:
                state = _bank_state(engine.bank(patch_size, batch_index))
            self._prior[key] = kernels.finalize(all_reduce_state(state))[:, 0].to(engine.dtype)
        return self._prior[key]


def _refuse_gradients(x: Tensor) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise PatchConfigError("gradients are not available with the bank split over ranks (the merge is not "
                               "differentiated); differentiate the machine in one process")


def _bank_state(source: Any) -> SoftmaxState:
    """The unnormalized prior state of a bank ([G, 1]: max logw, Σ w, Σ w·v), folded with a zero query."""
    from .engine.banks import ASSIGN_CHUNK_KEYS

    source.set_chunk_keys(min(source.num_keys, ASSIGN_CHUNK_KEYS))
    state = kernels.init_state((source.groups, 1), source.value_dim, torch.float64, source.device)
    zero = torch.zeros(source.groups, 1, source.dim + 1, dtype=torch.float64, device=source.device)
    for _, k_aug, logw, values in source.augmented_chunks(torch.float64):
        state = kernels.accumulate_reference(state, zero, k_aug, logw, values, 1.0)
    return state


def sharded_image_posterior(x: Tensor, alpha_bar: Tensor | float, images: Tensor, *, translates: bool = False,
                            log_weights: Tensor | None = None, dtype: torch.dtype = torch.float32,
                            topk: int = DEFAULT_TOPK, memory_budget: float = DEFAULT_MEMORY_BUDGET,
                            chunk_images: int | None = None, return_provenance: bool = False) -> Tensor:
    """`engine.image_posterior` (IS eq. 3–4, ES eq. 5–6) over this rank's shard `images` [n_r, C, H, W],
    merged over the ranks: x̂₀ [B, C, H, W] of x [B, C, H, W] over every rank's images."""
    if return_provenance:
        raise PatchConfigError("provenance is not available with the bank split over ranks; run without "
                               "--shard bank for provenance")
    _refuse_gradients(x)
    b, n = x.shape[0], images.shape[0]
    dev = x.device
    logw = (torch.zeros(n, dtype=torch.float64, device=dev) if log_weights is None
            else torch.as_tensor(log_weights, dtype=torch.float64, device=dev))
    source = WholeImages(images.detach().to(device=dev, dtype=torch.float32), logw, translates=translates)
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=dev).reshape(-1).expand(b).contiguous()
    x, ab = broadcast_tensor(x.detach()), broadcast_tensor(ab)
    a, s2 = noise_coefficients(ab)
    chunk = None if chunk_images is None else int(chunk_images) * source.shifts
    mean, _ = softmax_posterior(x.reshape(1, b, -1).to(dtype), a[None], s2[None], source, dtype=dtype, topk=topk,
                                memory_budget=memory_budget, chunk_keys=chunk, merge=all_reduce_state)
    return mean.reshape(x.shape).to(x.dtype)


BANK_SPLIT_MODELS = ("is", "es", "ls", "els", "bbels")


def bank_splittable(model: Any) -> bool:
    """Whether `shard_bank` applies: the patch-posterior machines (IS, ES, LS, ELS, bbELS)."""
    from .models.machines import ImageMachine, PatchMachine

    return isinstance(model, (ImageMachine, PatchMachine))


def shard_bank(model: Any) -> Any:
    """Turn a machine (IS, ES, LS, ELS, bbELS; every rank builds it on the same full data) into its bank-split
    form in place and return it: each rank keeps the contiguous shard `shard_range` of the training images (of
    each class, for a conditional machine) and every call merges the ranks' partial posteriors exactly.
    Needs an active process group; every rank must make the same calls."""
    from .models.machines import ImageMachine, PatchMachine

    if not bank_splittable(model):
        raise DistributedError(f"the bank split applies to the machines {', '.join(BANK_SPLIT_MODELS)}, not "
                               f"'{getattr(model, 'name', type(model).__name__)}'")
    if not active():
        shard_range(0)                            # raises the one-line error
    if isinstance(model, PatchMachine):
        build = model.engines.build

        def build_shard(images: Tensor) -> ShardedPatchPosterior:
            engine = build(images[shard_range(images.shape[0])])
            engine.prune = False                  # the bank split folds every key (GEMM route)
            return ShardedPatchPosterior(engine, float(images.abs().max()))
        engines = type(model.engines)(model.engines.data, model.conditional, build_shard)
        engines.device = model.engines.device
        model.engines = engines
    elif isinstance(model, ImageMachine):
        images = type(model.images)(model.images.data, model.conditional,
                                    lambda full: full[shard_range(full.shape[0])])
        images.device = model.images.device
        model.images = images
        model.posterior = sharded_image_posterior
    model.bank_split = world_size()
    return model


def check_shard(shard: str) -> str:
    """`shard` checked: 'seeds' (default; a no-op in one process) or 'bank' (needs a process group)."""
    if shard not in SHARDS:
        raise DistributedError(f"shard must be one of {SHARDS}, got {shard!r}")
    if shard == "bank" and not active():
        shard_range(0)
    return shard
