"""Language-model data: documents -> token stream (EOS between documents) -> fixed-length windows.

Token streams are cached in $KVTRAIN_HOME keyed by the tokenizer and the source, so a second run
starts at once. The training loader is resumable mid-epoch: the shuffle order is a pure function
of (seed, epoch), and the loader's state (epoch, batches consumed) rides in Lightning checkpoints,
so a run killed at step N and resumed sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from kvtrain.data.corpus import SPLITS, STDLIB, load_documents
from kvtrain.home import cached_entry


def tokenize_documents(docs: list[str], tokenizer: PreTrainedTokenizerBase, desc: str = "tokenize") -> torch.Tensor:
    """One int32 stream: each document's tokens followed by EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; set one to separate documents")
    ids: list[int] = []
    batch = 64
    for start in tqdm(range(0, len(docs), batch), desc=desc, unit="batch", leave=False, file=sys.stderr):
        for row in tokenizer(docs[start : start + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def _source_fingerprint(source: str | None) -> str:
    if source in (None, STDLIB):
        from kvtrain.data.corpus import stdlib_root

        return f"stdlib:{stdlib_root()}:{sys.version_info[:3]}"
    path = Path(source).expanduser().resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return json.dumps([str(path)] + [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def token_stream(source: str | None, split: str, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """The cached token stream of one split of `source` under `tokenizer`."""
    key = hashlib.sha256(
        (tokenizer.backend_tokenizer.to_str() + _source_fingerprint(source) + split).encode()
    ).hexdigest()[:24]

    def build(tmp: Path) -> None:
        stream = tokenize_documents(load_documents(source, split), tokenizer, desc=f"tokenize {split}")
        torch.save(stream, tmp / "tokens.pt")

    return torch.load(cached_entry(f"datasets/{key}-{split}", build) / "tokens.pt", weights_only=True)


class PackedDataset(Dataset):
    """Non-overlapping `seq_len` windows of a token stream; the trailing partial window is dropped."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if tokens.numel() < seq_len:
            raise ValueError(f"the corpus split has {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}")
        self.tokens, self.seq_len = tokens, seq_len

    def __len__(self) -> int:
        return self.tokens.numel() // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        window = self.tokens[i * self.seq_len : (i + 1) * self.seq_len].long()
        return {"input_ids": window, "attention_mask": torch.ones_like(window)}


class ResumableRandomSampler(DistributedSampler):
    """A permutation that depends only on (seed, epoch), which can skip the samples already consumed.

    Sharded over `replicas` ranks: rank r takes every replicas-th index from r, so the ranks' step-k
    batches together are the single-process step-k batch of `replicas` times the size. Being a
    DistributedSampler, Lightning uses it as it is instead of wrapping it.
    """

    def __init__(self, n: int, seed: int, replicas: int = 1, rank: int = 0):
        super().__init__(range(n), num_replicas=replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.n = n
        self._skip: tuple[int, int] | None = None  # (epoch, samples of all ranks to skip in it)

    def skip_once(self, epoch: int, samples: int) -> None:
        self._skip = (epoch, samples)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start, self._skip = self._skip[1], None
        usable = self.n // self.num_replicas * self.num_replicas  # every rank gets as many samples
        return iter(order[start + self.rank : usable : self.num_replicas])

    def __len__(self) -> int:
        return self.n // self.num_replicas


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints: its state is the epoch and the batches consumed in it.

    `consumed` reports batches the training loop has finished (not merely prefetched), so the
    state is exact whichever hook saves the checkpoint.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, consumed: Callable[[], int],
        replicas: int = 1, rank: int = 0, **kwargs,
    ):
        self.resumable_sampler = ResumableRandomSampler(len(dataset), seed, replicas, rank)
        super().__init__(dataset, batch_size=batch_size, sampler=self.resumable_sampler, drop_last=True, **kwargs)
        self._consumed = consumed

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.resumable_sampler.epoch, "batches": int(self._consumed())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.resumable_sampler
        sampler.skip_once(state["epoch"], state["batches"] * self.batch_size * sampler.num_replicas)


def resumable_loader(trainer: L.Trainer | None, dataset: Dataset, batch_size: int, seed: int, **kwargs) -> ResumableLoader:
    """A ResumableLoader sharded over the trainer's ranks that counts the batches its fit loop finished."""
    replicas, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)

    def consumed() -> int:
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer else 0

    return ResumableLoader(dataset, batch_size, seed, consumed, replicas=replicas, rank=rank, **kwargs)


class LMDataModule(L.LightningDataModule):
    """Packs a tokenized corpus into `seq_len` windows.

    Args:
        data: None/"stdlib" for the embedded corpus, a text file, a folder of text files, or a
            `datasets.save_to_disk` folder.
        tokenizer: tokenizer name/path ("kvtrain-ref" is the embedded BPE); by default the one of the
            model being trained (its `tokenizer_name`).
        seq_len: tokens per training window.
        batch_size: windows per batch.
        eval_batch_size: windows per validation/test batch (default: batch_size).
        text_column: the text column of a `datasets` folder.
        seed: shuffling seed (the order is reproducible and resumable).
    """

    def __init__(
        self,
        data: str | None = None,
        tokenizer: str | None = None,
        seq_len: int = 256,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        text_column: str = "text",
        num_workers: int = 0,
        seed: int = 1234,
    ):
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.data, self.tokenizer_name, self.seq_len = data, tokenizer, seq_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.text_column, self.num_workers, self.seed = text_column, num_workers, seed
        self.datasets: dict[str, PackedDataset] = {}
        self._loader_state: dict[str, int] | None = None

    def tokenizer(self) -> PreTrainedTokenizerBase:
        from kvtrain.models import REFERENCE, load_tokenizer

        module = self.trainer.lightning_module if self.trainer else None
        return load_tokenizer(self.tokenizer_name or getattr(module, "tokenizer_name", REFERENCE))

    def dataset(self, split: str) -> PackedDataset:
        if split not in self.datasets:
            tokens = token_stream(self.data, split, self.tokenizer())
            self.datasets[split] = PackedDataset(tokens, self.seq_len)
        return self.datasets[split]

    def prepare_data(self) -> None:
        """Tokenize the train and val splits into $KVTRAIN_HOME once per node (Lightning calls this on
        one process); the ranks' `setup` then loads the cached streams. A test split (which a corpus
        may not have) is built on first use; the cache's file lock makes concurrent builders wait."""
        for split in ("train", "val"):
            token_stream(self.data, split, self.tokenizer())

    def setup(self, stage: str) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}[stage]
        for split in needed:
            self.dataset(split)

    def train_dataloader(self) -> ResumableLoader:
        return resumable_loader(self.trainer, self.dataset("train"), self.batch_size, self.seed,
                                num_workers=self.num_workers)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.dataset(split), batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


__all__ = ["LMDataModule", "PackedDataset", "ResumableLoader", "resumable_loader", "SPLITS", "token_stream", "tokenize_documents"]
