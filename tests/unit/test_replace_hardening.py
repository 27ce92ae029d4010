"""Issue 20 item 6: `pull --force` (ModelWriter with overwrite) replaces atomically. A process killed between moving
the old model aside and renaming the new one in loses nothing: the next start brings the old model back."""

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from test_layout import write_model

from gdsllm_core.layout import ModelStore, ModelWriter, TokenizerInfo

KILLED_REPLACEMENT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    from test_layout import write_model
    from gdsllm_core.layout import ModelWriter, TokenizerInfo

    real_rename = os.rename
    def rename(source, target):
        if ".partial-" in str(source) and "replaced" not in str(source):
            os._exit(9)  # killed after the old model went aside, before the new one came in
        real_rename(source, target)
    os.rename = rename
    with ModelWriter({root!r}, "tiny", overwrite=True) as writer:
        writer.add_extent("token_embd", [("token_embd.weight", "F32", [2, 2], np.zeros(4, dtype=np.float32))])
        writer.finish("llama", {{"n_layers": 1}}, TokenizerInfo(kind="hf", file="tokenizer.json"),
                      files={{"tokenizer.json": b"{{}}"}})
""")


def test_a_replacement_killed_midway_keeps_the_old_model(tmp_path):
    old = write_model(tmp_path)
    code = KILLED_REPLACEMENT.format(tests=str(Path(__file__).parent), root=str(tmp_path))
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 9
    assert not (tmp_path / "tiny").exists()  # the crash window: the old model is aside
    entry = ModelStore(tmp_path).get("tiny")  # the next start recovers it
    assert {t.name for e in entry.manifest.extents for t in e.tensors} == set(old)
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".partial-replaced")] == []


def test_a_completed_replacement_leaves_nothing_aside(tmp_path):
    write_model(tmp_path)
    with ModelWriter(tmp_path, "tiny", overwrite=True) as writer:
        writer.add_extent("token_embd", [("token_embd.weight", "F32", [2, 2], np.ones(4, dtype=np.float32))])
        writer.finish("llama", {"n_layers": 1}, TokenizerInfo(kind="hf", file="tokenizer.json"),
                      files={"tokenizer.json": b"{}"})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tiny"]
    assert ModelStore(tmp_path).get("tiny").manifest.tensor_count() == 1
