from kvtrain.data.corpus import SPLITS, load_documents, split_of, stdlib_files
from kvtrain.data.lm import LMDataModule, PackedDataset, token_stream

__all__ = ["SPLITS", "LMDataModule", "PackedDataset", "load_documents", "split_of", "stdlib_files", "token_stream"]
