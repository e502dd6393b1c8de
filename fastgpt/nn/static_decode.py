"""GPT.generate's decode loop with static shapes, captured once in a CUDA graph and replayed per token.

Each decode step reads each sequence's token at its position, held in a device tensor (B,), writes its
keys and values into the preallocated caches there, attends to the sequence's first position + 1 cached
keys (fastgpt.functional.decode_attention_with_length: the Triton split-KV kernel reads the lengths on
the device), samples the next tokens on the device, writes them into the output buffer at position + 1
and advances the positions. The positions differ when the prompts do in length (GPT.generate given a
list of prompts): each row of the output holds its sequence from column 0. No shape and no host
value changes from one step to the next, so torch.cuda.CUDAGraph records one step and each token is one
replay: the host launches one graph instead of ~15 ops per block.

eos: the finished flags and the result's new-token count are updated inside the step; the host reads
them every EOS_CHECK_INTERVAL steps (one synchronisation each), so up to EOS_CHECK_INTERVAL - 1 steps
may run after every sequence finished; their tokens are cut off, and a streaming callback gets each
step's tokens at the check after it, only if they come before the end.

The step's buffers (the output, the KV caches, the position and flags) and its captured graph stay
with the model after the call (`decoder_for`), so the next call with the same batch, total length,
sampling and weights refills them and replays the graph from its first step: no eager warm-up steps
and no capture, which cost more host time than the rest of a short generation. One decoder per model
is kept; a call that needs another frees the old one first, and `release(model)` frees it outright.
"""

import itertools
import weakref

import torch

from fastgpt.nn.generation import sample_next_token_on_device

# Eager steps before the capture, on a side stream (torch.cuda.graphs' rule): the first runs the
# kernels' lazy initialisation and Triton's autotuning, which cannot run inside a capture; a second
# runs with every allocation already cached. They are real steps of the generation, not thrown away.
WARMUP_STEPS = 2
# With eos_token_id, the host checks whether every sequence finished once per this many tokens: a
# synchronisation per check, against at most this many - 1 wasted steps (~0.2 ms each for GPT-2 on an
# H200) once all finished.
EOS_CHECK_INTERVAL = 8


# The decoder kept for each model (at most one): weak keys, so a deleted model takes its buffers along.
_DECODERS = weakref.WeakKeyDictionary()


class StaticDecodeStep:
    """The state of a static decode loop: static buffers whose contents change, never their shapes.

    out: (B, total) int64, each row a prompt and the tokens chosen so far; caches: the model's KVCache
    per layer, filled up to `position` by the prefill. position: (B,) int64, each sequence's position
    of the token fed to the next step (its column in out). finished: (B,) bool. generated: () int64, the
    new tokens in out so far. end: () int64, the new tokens of the result (max_new_tokens, or the count
    at the step where every sequence had produced eos). max_new_tokens: the host's copy of this call's.
    block_params: the model's decode_block_parameters(), for a decode step run as one fused call (the
    cpu backend's; GPT.decode_hidden_state decides). graph: the captured step once `decode` has recorded
    it, replayed by every later call. `start` readies them for a call.
    """

    def __init__(self, out, caches, sampling, eos_token_id, block_params):
        batch, _ = out.shape
        self.out = out
        self.caches = caches
        self.max_new_tokens = 0  # start sets it
        self.position = torch.zeros(batch, dtype=torch.long, device=out.device)  # (B,)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=out.device)  # (B,)
        self.generated = torch.zeros((), dtype=torch.long, device=out.device)  # ()
        self.end = self.generated.clone()  # ()
        self.sampling = sampling  # (temperature, top_k, top_p)
        self.eos_token_id = eos_token_id
        self.block_params = block_params
        self.graph = None

    def start(self, positions, first_token, max_new_tokens):
        """Readies the step for a call whose prefill filled each sequence's cache up to its position
        (`positions`: (B,) int64 on out's device) and chose first_token (B,), the token at that column
        of out: the sequences it ends (eos) start finished."""
        self.max_new_tokens = max_new_tokens
        self.position.copy_(positions)
        if self.eos_token_id is None:
            self.finished.zero_()
        else:
            torch.eq(first_token, self.eos_token_id, out=self.finished)
        self.generated.fill_(1)
        self.end.fill_(max_new_tokens)

    def run(self, model):
        """One decode step of `model` (the GPT whose caches these are); device work only."""
        position = self.position  # (B,)
        tokens = self.out.gather(1, position[:, None])  # (B, 1)
        hidden = model.decode_hidden_state(tokens, position, self.caches, self.block_params)  # (B, C)
        next_token = sample_next_token_on_device(model.logits(hidden), *self.sampling)  # (B,)
        self.generated.add_(1)
        if self.eos_token_id is not None:
            next_token = next_token.masked_fill(self.finished, self.eos_token_id)
            self.finished |= next_token == self.eos_token_id
            # The first step at which all have finished sets the result's new-token count.
            all_done_end = torch.where(self.finished.all(), self.generated, self.end)  # ()
            torch.minimum(self.end, all_done_end, out=self.end)
        self.out.scatter_(1, position[:, None] + 1, next_token[:, None])
        position.add_(1)

    def newest_tokens(self):
        """(B,): the tokens the last step wrote, a copy (out is refilled by the next call)."""
        return self.out.gather(1, self.position[:, None])[:, 0]


class StreamedTokens:
    """Hands decode's new tokens to the callback. Without eos each step's tokens (B,) go out as soon as
    they are queued. With eos, the host learns where the generation ended only at its checks, so a
    step's tokens wait for the next check and go out only if they come before the end: the callback
    gets exactly the columns decode returns, as the per-op loop's does, never the steps run after
    every sequence had finished."""

    def __init__(self, step, callback):
        self.step, self.callback = step, callback
        self.pending = []  # (count, tokens (B,)) not yet handed over, with eos: the count-th new tokens

    def add(self, count):
        """Takes the tokens of the step that just ran, the count-th new tokens of each sequence."""
        if self.callback is None:
            return
        tokens = self.step.newest_tokens()  # (B,)
        if self.step.eos_token_id is None:
            self.callback(tokens)
        else:
            self.pending.append((count, tokens))

    def flush(self, end):
        """Hands over the waiting tokens up to the end-th new ones (the host's copy of step.end)."""
        for count, tokens in self.pending:
            if count <= end:
                self.callback(tokens)
        self.pending.clear()


def decoder_for(model, batch, total, sampling, eos_token_id, device):
    """The StaticDecodeStep kept for `model` if it fits this call (same batch, total length, sampling,
    eos_token_id, device, dtype, backend and parameter storage: a graph reads the weights where they
    were at capture, so moved or replaced parameters need a new one), else a new one with fresh buffers
    (the old one is freed first)."""
    weights = itertools.chain(model.parameters(), model.buffers())
    key = (device, batch, total, sampling, eos_token_id, model.config.backend)
    key += tuple(tensor.data_ptr() for tensor in weights)
    kept = _DECODERS.get(model)
    if kept is not None and kept[0] == key:
        return kept[1]
    _DECODERS.pop(model, None)
    out, caches = model._generation_buffers(batch, total, device)
    step = StaticDecodeStep(out, caches, sampling, eos_token_id, model.decode_block_parameters())
    _DECODERS[model] = (key, step)
    return step


def release(model):
    """Frees the buffers and the CUDA graph that generate(cuda_graph=True) kept for `model`."""
    _DECODERS.pop(model, None)


def decode(model, step, steps, callback=None, capture=True):
    """Runs up to `steps` decode steps from the positions `step.start` set; returns the number of new
    tokens each row of step.out holds after its prompt (the caller copies them out: out itself is
    refilled by the next call).

    capture: replay the step's CUDA graph, recording it first after WARMUP_STEPS eager steps if no
    earlier call did (CUDA tensors only); False runs every step eagerly (any device). callback gets
    each step's new tokens (B,), a copy: as soon as they are queued (no synchronisation), or with
    eos_token_id at the next end check (StreamedTokens), so that it never sees a step after the end.
    """
    eager_steps = min(steps, WARMUP_STEPS) if capture and step.graph is None else 0
    streamed = StreamedTokens(step, callback)
    end = step.max_new_tokens  # the result's new tokens: all unless eos ends them
    done = 0
    while done < steps:
        if done < eager_steps:
            side = torch.cuda.Stream(device=step.out.device)
            side.wait_stream(torch.cuda.current_stream(step.out.device))
            with torch.cuda.stream(side):
                step.run(model)
            torch.cuda.current_stream(step.out.device).wait_stream(side)
        elif capture:
            if step.graph is None:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step.run(model)
                step.graph = graph  # kept only once recorded: a failed capture leaves none to replay
            step.graph.replay()
        else:
            step.run(model)
        done += 1
        streamed.add(1 + done)  # the prefill chose the first new tokens
        if step.eos_token_id is not None and done % EOS_CHECK_INTERVAL == 0:
            end = int(step.end)
            streamed.flush(end)
            if end < step.max_new_tokens:
                break
    else:  # every step ran: with eos, read the end once more for the steps since the last check
        if step.eos_token_id is not None:
            end = int(step.end)
            streamed.flush(end)
    return end
