"""Where one training step's time goes: torch.profiler over a few steps of
seg.training.step.train_step, as tools/bench_train.py times it (its ``training_step``: the
same fixed batch, model, augmentation, loss and Adam).

    python tools/bench_train.py --step --depth 34 --batch 8 --precision bf16 --channels-last --profile [--json FILE]

Two tables, per step: the top ops by self time (on CUDA the device time of the kernels each
op launched, on the CPU its self CPU time) with their count and share, and the step's time
in the categories of issue 24 (loss, augmentation, upsampling, convolution, batch norm and
activations, optimizer, copies and synchronisations, other). Every time is the profiler's
own (``key_averages`` for the ops; each event's self time, from the same profile, for the
categories); the categories partition it, so their shares sum to 1. tools/gpu_check.py runs
this once for the study's row and keeps the result under ``"profile"``.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

from bench_train import SpeedRow, synchronize, training_step  # a tool beside this one

CATEGORIES = ("loss", "augmentation", "upsampling", "convolution", "batchnorm_activation", "optimizer",
              "copy_sync", "other")  # fmt: skip

# (pattern, category, whole range): searched (case-insensitive) in op and range names, first
# match wins. A "whole range" claims every op inside it, whatever that op's own name says
# (the loss's interpolate is loss, not upsampling); other patterns name single ops, and an op
# matching none takes the category of its nearest ancestor that matches one.
PATTERNS: tuple[tuple[str, str, bool], ...] = (
    # tools/bench_train.py's ranges around CombinedLoss (CE + Dice, fp32 at full resolution)
    # and DeviceAugment (photometric ops, normalisation)
    (r"^seg::loss$", "loss", True),
    (r"^seg::augment$", "augmentation", True),
    # torch's own ranges around every optimizer's step and zero_grad
    (r"^Optimizer\.(step|zero_grad)#", "optimizer", True),
    # multi-tensor (foreach/fused) Adam, and clip_grad_norm_'s norms and scaling
    (r"_foreach_|_fused_adam", "optimizer", False),
    # CE (log_softmax + nll_loss) and Dice (softmax, one_hot) ops and their backward nodes
    (r"softmax|nll_?loss|cross_entropy|one_hot", "loss", False),
    # the decoder's and the logits' bilinear upsampling and its backward
    (r"upsample|interpolate|grid_sampler", "upsampling", False),
    # before "conv|cudnn": cudnn_batch_norm is batch norm; ReLU's backward is threshold_backward
    (r"batch_?norm|relu|threshold_backward|dropout", "batchnorm_activation", False),
    # aten::convolution and its cudnn/mkldnn kernels, forward and backward
    (r"conv|cudnn", "convolution", False),
    # host<->device copies and dtype casts (autocast's included), CUDA syncs, .item()
    (r"copy_|^aten::(to|item)$|_?to_?copy|memcpy|memset|synchronize|_local_scalar_dense", "copy_sync", False),
)
_COMPILED = [(re.compile(pattern, re.IGNORECASE), category, whole) for pattern, category, whole in PATTERNS]
_BACKWARD = "autograd::engine::evaluate_function:"  # the autograd node's range around each backward op


def category_of(name: str, whole_range: bool = False) -> str | None:
    """The category that an op or range name says (``whole_range``: only the patterns that
    claim every op inside them), or None."""
    for pattern, category, whole in _COMPILED:
        if (whole or not whole_range) and pattern.search(name):
            return category
    return None


def categorise(events: list[Any]) -> list[tuple[Any, str]]:
    """Each CPU-side event of a profile with its category. An event inside a whole range takes
    its category; a backward node of an op that ran inside one (linked by the autograd
    sequence number) and the ops under it too; any other event its own name's category, else
    its nearest ancestor's, else "other"."""
    cpu = [e for e in events if e.device_type == DeviceType.CPU]

    def ancestors(event: Any) -> list[Any]:
        chain = []
        while event is not None:
            chain.append(event)
            event = event.cpu_parent
        return chain

    def range_category(event: Any) -> str | None:
        return next((c for e in ancestors(event) if (c := category_of(e.name, whole_range=True))), None)

    def backward_node(event: Any) -> Any:
        return next((e for e in ancestors(event) if e.name.startswith(_BACKWARD)), None)

    # A forward op's sequence number is its autograd node's, which the backward node carries.
    # Ops that make no node share the number of the next one that does: the last to start wins.
    forward = {e.sequence_nr: range_category(e) for e in sorted(cpu, key=lambda e: e.time_range.start)
               if e.sequence_nr >= 0 and backward_node(e) is None}  # fmt: skip
    categorised = []
    for event in cpu:
        chain = ancestors(event)
        backward = backward_node(event)
        category = (range_category(event) or (forward.get(backward.sequence_nr) if backward else None)
                    or next((c for e in chain if (c := category_of(e.name))), "other"))  # fmt: skip
        categorised.append((event, category))
    return categorised


def category_times(events: list[Any], cuda: bool) -> dict[str, float]:
    """Microseconds by category: each CPU-side event's self time, on CUDA its self device time
    (the kernels it launched itself; the kernels' own events are left out, so none counts twice,
    and so are ranges such as ``seg::loss``, which launch none: their device-side spans are
    not kernels)."""
    times = dict.fromkeys(CATEGORIES, 0.0)
    for event, category in categorise(events):
        if cuda and not event.is_user_annotation:
            times[category] += event.self_device_time_total
        elif not cuda:
            times[category] += event.self_cpu_time_total
    return times


def profile_train_step(row: SpeedRow, device: torch.device, steps: int = 3, warmup: int = 2,
                       top: int = 15) -> dict[str, Any]:  # fmt: skip
    """torch.profiler over ``steps`` training steps of this row after ``warmup`` unprofiled
    ones: the top ops and the categories, in ms per step and share of the profiled time. A
    row that runs out of memory or breaks is reported in the result (``status``), not raised."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    measured = "self CUDA time of the kernels each op launched" if cuda else "self CPU time"
    result: dict[str, Any] = {**row, "device": device.type, "steps": steps, "warmup": warmup, "time": measured}
    try:
        with training_step(row, device) as step:
            for _ in range(warmup):
                step()
            synchronize(cuda)
            with profile(activities=activities) as profiler:
                started = time.perf_counter()
                for _ in range(steps):
                    with record_function("seg::step"):  # its self time: Python between the ops
                        step()
                synchronize(cuda)
                wall = time.perf_counter() - started
    except torch.cuda.OutOfMemoryError:
        return {**result, "status": "oom"}
    except Exception as e:  # reported, not fatal
        return {**result, "status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    events = profiler.events()
    times = category_times(events, cuda)
    total = sum(times.values())
    if total <= 0:  # on CUDA without CUPTI the profiler sees no kernel
        return {**result, "status": "error", "error": f"the profiler recorded no {measured}"}
    result["wall_ms_per_step"] = round(1000 * wall / steps, 2)  # with the profiler's overhead
    result["busy_ms_per_step"] = round(total / 1000 / steps, 2)
    if cuda:  # torch's own sum of the kernels (its table's footer): the categories' total should equal it
        kernels = [e for e in events if e.device_type != DeviceType.CPU and not e.is_user_annotation]
        result["kernel_ms_per_step"] = round(sum(e.self_device_time_total for e in kernels) / 1000 / steps, 2)
    result["categories"] = {c: {"ms_per_step": round(t / 1000 / steps, 3), "share": round(t / total, 4)}
                            for c, t in times.items()}  # fmt: skip
    # on CUDA the ranges' device-side spans are not kernels (see category_times)
    ops = [a for a in profiler.key_averages() if a.device_type == DeviceType.CPU]
    ops = [a for a in ops if not (cuda and a.is_user_annotation)]
    own = (lambda a: a.self_device_time_total) if cuda else (lambda a: a.self_cpu_time_total)
    ops.sort(key=own, reverse=True)
    result["top_ops"] = [{"op": a.key, "count_per_step": a.count / steps, "ms_per_step": round(own(a) / 1e3 / steps, 3),
                          "share": round(own(a) / total, 4)} for a in ops[:top] if own(a) > 0]  # fmt: skip
    # the host waits for the device in these (on the CPU they are only counted): .item(),
    # boolean indexing (nonzero), explicit synchronisation
    waits = re.compile(r"synchroni[sz]e|_local_scalar_dense|^aten::nonzero$", re.IGNORECASE)
    syncs = Counter(e.name for e in events if waits.search(e.name))
    result["host_syncs_per_step"] = {name: n / steps for name, n in sorted(syncs.items())}
    result["status"] = "ok"
    return result


def format_profile(p: dict[str, Any]) -> str:
    """The two tables in markdown, with a line saying what was profiled."""
    if p["status"] != "ok":
        return f"profile: {p['status']} {p.get('error', '')}".rstrip()
    kernels = f"; kernels in all {p['kernel_ms_per_step']} ms" if "kernel_ms_per_step" in p else ""
    syncs = ", ".join(f"{k} {v:g}" for k, v in p["host_syncs_per_step"].items()) or "none"
    lines = [f"profile of R{p['depth']}-OS8 batch {p['batch']} {p['precision']} "
             f"channels_last {'on' if p['channels_last'] else 'off'} at {p['size']} on {p['device']}, "
             f"{p['steps']} steps after {p['warmup']}: {p['busy_ms_per_step']} ms per step of {p['time']} "
             f"(wall {p['wall_ms_per_step']} ms, profiled{kernels}); host syncs per step: {syncs}",
             "", "| category | ms per step | share |", "| --- | --- | --- |"]  # fmt: skip
    lines += [f"| {c} | {v['ms_per_step']:.2f} | {100 * v['share']:.1f}% |" for c, v in p["categories"].items()]
    lines += ["", "| op | calls per step | ms per step | share |", "| --- | --- | --- | --- |"]
    lines += [f"| {o['op']} | {o['count_per_step']:g} | {o['ms_per_step']:.2f} | "
              f"{100 * o['share']:.1f}% |" for o in p["top_ops"]]  # fmt: skip
    return "\n".join(lines)
