"""fastgpt's part of torch.compile's cache key.

torch.compile's caches (AOTAutograd's and Inductor's) key a compiled graph on the graph Dynamo traced.
That graph names fastgpt's operators but says nothing of what their autograd does, and AOTAutograd
caches the backward graph it traced through that autograd. So after fastgpt's code changes (a rebuild
of fastgpt._C, an edited or upgraded package), a cached backward of the old code would be reused with
the new forward: a GPT compiled before a change of the cross-entropy's gradient scaling got wrong
gradients this way (tests/test_nn.py::test_torch_compile_fullgraph, with a warm cache).

Importing fastgpt therefore adds the identity of its code to torch.compile's cache key tag
(torch.compiler.config.cache_key_tag, which both caches hash): the size and modification time of every
file of the package, fastgpt._C included. Graphs without fastgpt's operators only lose cache hits
across fastgpt versions.
"""

import hashlib
import os

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
CODE_SUFFIXES = (".py", ".so", ".pyd")


def code_identity(package_dir=PACKAGE_DIR):
    """A short hash of the size and modification time of every code file under package_dir."""
    stats = []
    for directory, subdirectories, files in os.walk(package_dir):
        subdirectories[:] = sorted(d for d in subdirectories if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(CODE_SUFFIXES):
                path = os.path.join(directory, name)
                status = os.stat(path)
                stats.append((os.path.relpath(path, package_dir), status.st_size, status.st_mtime_ns))
    return hashlib.sha256(repr(stats).encode()).hexdigest()[:16]


def tag_compile_caches():
    """Appends fastgpt-<code identity> to torch.compiler.config.cache_key_tag, keeping the user's tag."""
    tag = f"fastgpt-{code_identity()}"
    current = torch.compiler.config.cache_key_tag
    if tag not in current.split():
        torch.compiler.config.cache_key_tag = f"{current} {tag}".strip()
