"""Shared test set-up. Everything runs on CPU with tiny models built from configs: no downloads."""

import os

# transformers' bitnet unpacking is wrapped in torch.compile: ~50 s to compile on 2 cores, instant when eager.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
