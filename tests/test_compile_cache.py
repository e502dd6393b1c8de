"""fastgpt's part of torch.compile's cache key (fastgpt/compile_cache.py)."""

import os

import torch

import fastgpt  # noqa: F401  (importing fastgpt tags the caches)
from fastgpt import compile_cache


def test_code_identity_follows_every_code_file(tmp_path):
    (tmp_path / "ops").mkdir()
    module, library, notes = tmp_path / "ops" / "kernel.py", tmp_path / "_C.so", tmp_path / "notes.txt"
    for path in (module, library, notes):
        path.write_text("x = 1\n")
    before = compile_cache.code_identity(tmp_path)
    assert compile_cache.code_identity(tmp_path) == before

    os.utime(library, ns=(0, os.stat(library).st_mtime_ns + 1_000_000))  # a rebuilt extension
    after_rebuild = compile_cache.code_identity(tmp_path)
    assert after_rebuild != before

    module.write_text("x = 22\n")  # an edited module
    assert compile_cache.code_identity(tmp_path) != after_rebuild

    unchanged = compile_cache.code_identity(tmp_path)
    notes.write_text("not code\n")
    assert compile_cache.code_identity(tmp_path) == unchanged


def test_import_tags_the_compile_caches_and_keeps_the_users_tag(monkeypatch):
    tag = f"fastgpt-{compile_cache.code_identity()}"
    assert tag in torch.compiler.config.cache_key_tag.split()

    monkeypatch.setattr(torch.compiler.config, "cache_key_tag", "my-experiment")
    compile_cache.tag_compile_caches()
    compile_cache.tag_compile_caches()  # idempotent
    assert torch.compiler.config.cache_key_tag == f"my-experiment {tag}"
