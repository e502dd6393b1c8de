"""Training, fine-tuning and evaluation of fastgpt.nn.GPT, behind `fastgpt train | generate | eval`.

tokenizer.py   the built-in byte tokenizer and local BPE files (the tokenizers package)
data.py        the text (a file, a directory, or the standard library's sources), split and batched
loop.py        the Trainer: AdamW, warmup + cosine, accumulation, bf16 master weights, DDP, evaluation
step.py        how a step runs: eager, torch.compile, or the whole step replayed from a CUDA graph
checkpoint.py  safetensors + JSON checkpoints, written atomically; loading fastgpt and HF GPT-2 dirs
runtime.py     the device, the compute dtype and the torchrun process group
errors.py      UserError: what the command line reports in one line
"""
