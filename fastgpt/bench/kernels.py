"""The measurement of one kernel op at one shape: shared by attention, FFN, LayerNorm and
cross-entropy, which describe themselves by subclassing KernelBench.

For each mode (forward, then forward+backward) every provider is
1. called once (compilation, autotuning) — a provider that raises is reported as skipped with the error;
2. timed, interleaved with the others (timing.measure_interleaved);
3. called once more for its peak memory;
4. called once more on the first input set for its error against the float64 reference: the maximum
   absolute difference over the output(s) and, for forward+backward, every input gradient.

"fwd" runs under torch.no_grad(), as inference does; "fwd+bwd" runs the forward with autograd and
`torch.autograd.grad` of the outputs with fixed random output gradients, so gradients are fresh tensors
each call (as after `zero_grad(set_to_none=True)`).
"""

import functools

import torch

from fastgpt.bench import flops as counts
from fastgpt.bench import timing
from fastgpt.bench.providers import baseline, compiled, fastgpt_providers, reset_compiled, select
from fastgpt.bench.records import dtype_name, matmul_peak


def as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class KernelBench:
    """One kernel op. Subclasses set the class attributes and implement the methods below."""

    name = ""  # the op's name in records and on the command line
    public_op = None  # staticmethod: the fastgpt function, called as public_op(**tensors, backend=...)
    reference_op = None  # staticmethod: fastgpt.reference's definition, called as reference_op(**tensors)
    metric = "tflops"  # the headline: "tflops" (compute-bound) or "gbps" (memory-bound)
    modes = counts.MODES
    # Providers whose GPU kernels are named in their records ("gpu_kernels", from one profiled call):
    # those that choose a kernel themselves, such as SDPA.
    profiled_providers = ()

    def shapes(self, device_type, sweep):
        """The shapes (dicts) of a sweep ('full', 'quick' or 'tiny') on 'cpu' or 'cuda'."""
        raise NotImplementedError

    def tensors(self, shape, dtype, device):
        """Fresh random inputs, by the public op's argument names; differentiable ones require grad."""
        raise NotImplementedError

    def grad_outputs(self, shape, dtype, device):
        """Random gradients for the op's outputs (a tuple, one per output)."""
        raise NotImplementedError

    def baselines(self, shape, dtype, device):
        """The baseline providers; `eager` and `torch.compile` of the reference come for free."""
        return []

    def fastgpt_variants(self, shape, dtype, device):
        """fastgpt providers beside one per backend: a backend run with an opt-in kernel (named
        `fastgpt:<backend>[<variant>]`). None by default."""
        return []

    def flops(self, shape, mode):
        return None

    def bytes(self, shape, dtype, mode):
        return None

    def error_scope(self, shape, device):
        """(select, note): `select(name, value)` narrows an input, output ('out0', ...) or gradient
        ('d' + input name) to the part the float64 reference is computed on, and `note` says which.
        The default is the whole shape."""
        return (lambda name, value: value), "full shape"

    # ------------------------------------------------------------------------------------------

    def eager_skip(self, shape, dtype, device):
        """Why the eager reference (and its torch.compile) is not run at this shape, or None."""

    def compile_skip(self, shape, dtype, device):
        """Why torch.compile of the eager reference is not run at this shape, or None. It recompiles at
        every shape (5-15 s each on a GPU), so on GPU it runs at the op's first full-sweep shape only,
        which keeps benchmarks/gpu_check.sh within its time budget; the fused baselines run at every shape."""
        if torch.device(device).type == "cuda" and shape != self.shapes("cuda", "full")[0]:
            return "compiled at the op's first GPU shape only (compile time within the GPU budget)"
        return None

    def providers(self, shape, dtype, device, include=None, exclude=None):
        eager_skip = self.eager_skip(shape, dtype, device)
        compile_skip = eager_skip or self.compile_skip(shape, dtype, device)
        eager = [
            baseline("eager", self.reference_op, eager_skip),
            baseline("torch.compile", None if compile_skip else compiled(self.reference_op), compile_skip),
        ]
        every = (
            fastgpt_providers(self.public_op, device)
            + self.fastgpt_variants(shape, dtype, device)
            + eager
            + self.baselines(shape, dtype, device)
        )
        return select(every, include, exclude)

    def provider_names(self, shape, dtype, device):
        return [provider.name for provider in self.providers(shape, dtype, device)]

    def benchmark_call(self, shape, dtype, device, provider_name, mode):
        """(call, None): a no-argument callable running one provider once at one shape (synchronised
        on GPU), for pytest-benchmark; or (None, the reason it cannot run)."""
        (provider,) = self.providers(shape, dtype, device, include=[provider_name])
        if provider.skip:
            return None, provider.skip
        tensors, grad_outputs = self.tensors(shape, dtype, device), self.grad_outputs(shape, dtype, device)
        step = _step(provider.fn, mode)

        def call():
            result = step(tensors, grad_outputs)
            timing.synchronize(device)
            return result

        return call, None

    def work(self, shape, dtype, mode):
        """{"flops": ..., "bytes": ...} of one call (None where not counted)."""
        return {"flops": self.flops(shape, mode), "bytes": self.bytes(shape, dtype, mode)}

    def run_case(self, shape, dtype, device, plan, peaks, include=None, exclude=None):
        """Records and skip notes for every provider and mode at one shape."""
        device = torch.device(device)
        reset_compiled()
        first = self.tensors(shape, dtype, device)
        copies = timing.rotation_copies(tensor_bytes(first.values()), device)
        input_sets = [first] + [self.tensors(shape, dtype, device) for _ in range(copies - 1)]
        grad_sets = [self.grad_outputs(shape, dtype, device) for _ in input_sets]
        providers = self.providers(shape, dtype, device, include, exclude)
        records, skipped = [], []
        for mode in counts.MODES:
            reference = self._reference(shape, input_sets[0], grad_sets[0], mode, device)
            callables, first_call_s = {}, {}
            for provider in providers:
                note = {
                    "op": self.name,
                    "shape": shape,
                    "dtype": dtype_name(dtype),
                    "mode": mode,
                    "provider": provider.name,
                    "kind": provider.kind,
                }
                if provider.skip:
                    skipped.append({**note, "reason": provider.skip})
                    continue
                call = timing.rotating(_step(provider.fn, mode), list(zip(input_sets, grad_sets)))
                try:
                    first_call_s[provider.name], _ = timing.timed_first_call(call, device)
                except Exception as error:  # noqa: BLE001 - report it and go on with the others
                    skipped.append({**note, "reason": f"error: {type(error).__name__}: {error}"[:500]})
                    continue
                callables[provider.name] = call
            timings = timing.measure_interleaved(callables, device, plan) if callables else {}
            for provider in providers:
                if provider.name not in timings:
                    continue
                peak = timing.peak_memory_bytes(
                    functools.partial(_step(provider.fn, mode), input_sets[0], grad_sets[0]), device
                )
                detail = self._errors(
                    provider.fn, shape, input_sets[0], grad_sets[0], mode, reference, device
                )
                record = self._record(
                    shape,
                    dtype,
                    device,
                    mode,
                    provider,
                    timings[provider.name],
                    first_call_s[provider.name],
                    copies,
                    peak,
                    detail,
                    peaks,
                )
                if provider.name in self.profiled_providers and device.type == "cuda":
                    record["gpu_kernels"] = timing.gpu_kernel_names(callables[provider.name], device)
                records.append(record)
        return records, skipped

    def _reference(self, shape, tensors, grad_outputs, mode, device):
        """Float64 outputs (and input gradients) on the part of the inputs that error_scope selects."""
        select, _ = self.error_scope(shape, device)
        inputs64 = {}
        for name, value in tensors.items():
            if isinstance(value, torch.Tensor):
                part = select(name, value.detach())
                value = part.double() if part.is_floating_point() else part
                value.requires_grad_(tensors[name].requires_grad and mode == counts.FWD_BWD)
            inputs64[name] = value
        outputs = as_tuple(self.reference_op(**inputs64))
        result = {f"out{i}": out.detach() for i, out in enumerate(outputs)}
        if mode == counts.FWD_BWD:
            grads_in = [select(f"out{i}", g).double() for i, g in enumerate(grad_outputs)]
            names = _differentiable(inputs64)
            grads = torch.autograd.grad(outputs, [inputs64[name] for name in names], grads_in)
            result.update({f"d{name}": grad for name, grad in zip(names, grads)})
        return result

    def _errors(self, fn, shape, tensors, grad_outputs, mode, reference, device):
        select, _ = self.error_scope(shape, device)
        with torch.no_grad() if mode == counts.FWD else torch.enable_grad():
            outputs = as_tuple(fn(**tensors))
        produced = {f"out{i}": out.detach() for i, out in enumerate(outputs)}
        if mode == counts.FWD_BWD:
            names = _differentiable(tensors)
            grads = torch.autograd.grad(
                outputs, [tensors[name] for name in names], _matching(grad_outputs, outputs)
            )
            produced.update({f"d{name}": grad for name, grad in zip(names, grads)})
        errors = {}
        for name, expected in reference.items():
            actual = select(name, produced[name]).double()
            difference = (actual - expected).abs()
            errors[name] = float(difference.max()) if difference.numel() else 0.0
        return errors

    def _record(
        self, shape, dtype, device, mode, provider, timing_result, first_call_s, copies, peak, errors, peaks
    ):
        seconds = timing_result.median_ms * 1e-3
        work_flops, work_bytes = self.flops(shape, mode), self.bytes(shape, dtype, mode)
        tflops = work_flops / seconds / 1e12 if work_flops else None
        gbps = work_bytes / seconds / 1e9 if work_bytes else None
        if self.metric == "tflops":
            peak_value = matmul_peak(peaks, dtype)
            pct = 100 * tflops / peak_value if tflops and peak_value else None
        else:
            peak_value = peaks.get("copy_gbps")
            pct = 100 * gbps / peak_value if gbps and peak_value else None
        return {
            "op": self.name,
            "shape": dict(shape),
            "dtype": dtype_name(dtype),
            "device": peaks["device"],
            "provider": provider.name,
            "kind": provider.kind,
            "mode": mode,
            "median_ms": timing_result.median_ms,
            "iqr_ms": timing_result.iqr_ms,
            "min_ms": timing_result.min_ms,
            "max_ms": timing_result.max_ms,
            "samples": timing_result.samples,
            "round_ms": list(timing_result.round_ms),
            "first_call_s": first_call_s,
            "input_copies": copies,
            "metric": self.metric,
            "tflops": tflops,
            "gbps": gbps,
            "tokens_per_s": None,
            "pct_of_peak": pct,
            "err_vs_reference": max(errors.values()) if errors else None,
            "err_detail": errors,
            "err_note": self.error_scope(shape, device)[1],
            "peak_mem_bytes": int(peak),
        }


def _differentiable(tensors):
    return [
        name for name, value in tensors.items() if isinstance(value, torch.Tensor) and value.requires_grad
    ]


def _matching(grad_outputs, outputs):
    """Output gradients in each output's dtype (a baseline may return its loss in another dtype)."""
    return [g if g.dtype == out.dtype else g.to(out.dtype) for g, out in zip(grad_outputs, outputs)]


def _step(fn, mode):
    """step(tensors, grad_outputs): the forward, or the forward and the input gradients."""
    if mode == counts.FWD:

        def forward(tensors, grad_outputs):
            with torch.no_grad():
                return fn(**tensors)

        return forward

    def forward_backward(tensors, grad_outputs):
        outputs = as_tuple(fn(**tensors))
        names = _differentiable(tensors)
        return torch.autograd.grad(
            outputs, [tensors[name] for name in names], _matching(grad_outputs, outputs)
        )

    return forward_backward
