"""Nothing lost: publishing never replaces what kvtrain did not write, a failed rename keeps both
folders, exports refuse foreign destinations before any work, and processes building the same cache
entry at once do not clobber each other."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from kvtrain.home import MANIFEST, cached_entry, is_complete, publish


def built(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "weights.txt").write_text(text)
    return folder


def test_publish_refuses_a_non_empty_folder_kvtrain_did_not_write(tmp_path):
    work = built(tmp_path / "work", "a user's thesis")
    with pytest.raises(FileExistsError, match="non-empty folder that kvtrain did not write"):
        publish(built(tmp_path / "new", "model"), work)
    assert (work / "weights.txt").read_text() == "a user's thesis" and (tmp_path / "new").is_dir()
    afile = tmp_path / "notes.txt"
    afile.write_text("keep")
    with pytest.raises(FileExistsError, match="non-empty file"):
        publish(tmp_path / "new", afile)
    publish(tmp_path / "new", work, overwrite=True)  # told to
    assert (work / "weights.txt").read_text() == "model" and is_complete(work)


def test_publish_replaces_empty_folders_and_its_own_exports(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    publish(built(tmp_path / "a", "one"), empty)
    assert (empty / "weights.txt").read_text() == "one"
    publish(built(tmp_path / "b", "two"), empty)  # kvtrain wrote it (its manifest): replaced
    assert (empty / "weights.txt").read_text() == "two" and is_complete(empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing left aside


def test_a_failed_rename_keeps_the_old_folder_and_the_new_one(tmp_path, monkeypatch):
    target = tmp_path / "model"
    publish(built(tmp_path / "v1", "old"), target)
    new = built(tmp_path / "v2", "new")
    real_replace, calls = os.replace, []

    def failing_second_rename(src, dst):  # moving the old folder aside works; moving the new one in fails
        calls.append((Path(src), Path(dst)))
        if len(calls) == 2:
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="disk full"):
        publish(new, target)
    monkeypatch.undo()
    assert (target / "weights.txt").read_text() == "old" and is_complete(target)  # put back
    assert (new / "weights.txt").read_text() == "new"  # not deleted
    assert calls[0][0] == target and calls[1] == (new, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "v2"]


def test_write_export_keeps_a_complete_export_when_the_final_move_fails(tmp_path, monkeypatch):
    from kvtrain.callbacks import export

    def fail(tmp, target, overwrite=False):
        raise OSError("cross-device link")

    monkeypatch.setattr(export, "publish", fail)
    with pytest.raises(OSError, match=r"could not move the export into .*; it is complete in (\S+)") as info:
        export.write_export(lambda folder: (folder / "w.txt").write_text("trained"), None, tmp_path / "out")
    kept = Path(str(info.value).rsplit(" in ", 1)[1])
    assert (kept / "w.txt").read_text() == "trained"


class _Tiny(L.LightningModule):
    def __init__(self, tiny_model_dir):
        super().__init__()
        from kvtrain.models import load_model

        self.model = load_model(str(tiny_model_dir))
        self.layer = torch.nn.Linear(1, 1)
        self.trained_steps = 0

    def training_step(self, batch, batch_idx):
        self.trained_steps += 1
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.layer.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=2)

    def export(self, path, merge_lora=True):
        self.model.save_pretrained(path)


def test_export_pretrained_refuses_bad_destinations_before_training(tmp_path, tiny_model_dir, monkeypatch):
    from kvtrain.callbacks import ExportPretrained
    from kvtrain.models import embedded_model_path

    work = built(tmp_path / "work", "a user's files")
    module = _Tiny(tiny_model_dir)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ExportPretrained(str(work))])
    with pytest.raises(FileExistsError, match="kvtrain did not write"):
        trainer.fit(module)
    assert module.trained_steps == 0 and (work / "weights.txt").read_text() == "a user's files"
    # the embedded reference model is kvtrain's, but every kvtrain-ref run resolves to it: only on request
    monkeypatch.setenv("KVTRAIN_HOME", str(tmp_path / "home"))
    publish(built(tmp_path / "ref", "reference"), embedded_model_path())
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ExportPretrained("kvtrain-ref")])
    with pytest.raises(FileExistsError, match="would replace the embedded reference model"):
        trainer.fit(module)
    assert (embedded_model_path() / "weights.txt").read_text() == "reference"
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ExportPretrained("kvtrain-ref", overwrite=True)])
    trainer.fit(module)
    assert module.trained_steps == 2 and (embedded_model_path() / "config.json").is_file()
    assert not (embedded_model_path() / "weights.txt").exists()


BUILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from kvtrain.home import cached_entry

    def build(folder):
        with open(sys.argv[2], "a") as log:
            log.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # long enough that the other process arrives while this one builds
        (Path(folder) / "tokens.txt").write_text("built by " + str(os.getpid()))

    print(cached_entry(sys.argv[1], build))
""")


def test_two_processes_building_the_same_entry_at_once(tmp_path):
    env = {**os.environ, "KVTRAIN_HOME": str(tmp_path / "home")}
    log = tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, "datasets/shared", str(log)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    entry = tmp_path / "home" / "datasets" / "shared"
    assert {out.strip() for out, _ in outs} == {str(entry)} and is_complete(entry)
    assert len(log.read_text().split()) == 1  # built once; the other process waited and loaded it
    assert json.loads((entry / MANIFEST).read_text()).keys() == {"tokens.txt"}


def test_lm_data_is_built_in_prepare_data(tmp_path, corpus_file, home, monkeypatch):
    import kvtrain.data.lm as lm
    from kvtrain.data import LMDataModule

    data = LMDataModule(data=str(corpus_file), tokenizer="kvtrain-ref", seq_len=32, batch_size=2)
    data.prepare_data()  # once per node, before the ranks' setup

    def no_building(*args, **kwargs):
        raise AssertionError("setup tokenized again")

    monkeypatch.setattr(lm, "tokenize_documents", no_building)
    fresh = LMDataModule(data=str(corpus_file), tokenizer="kvtrain-ref", seq_len=32, batch_size=2)
    fresh.setup("fit")
    assert len(fresh.dataset("train")) > 0 and len(fresh.dataset("val")) > 0


def test_write_json_never_leaves_half_a_file(tmp_path, monkeypatch):
    from kvtrain.eval import write_json

    target = write_json(tmp_path / "result.json", {"done": 1})
    real_write = Path.write_text

    def crash_halfway(self, text, *args, **kwargs):  # the process dies in the middle of writing
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError("killed")

    monkeypatch.setattr(Path, "write_text", crash_halfway)
    with pytest.raises(OSError, match="killed"):
        write_json(target, {"done": 2, "rows": list(range(100))})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"done": 1}  # a done marker is whole or absent, never half
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
