"""The data pipeline: ``prepare-data`` (corpus -> tokenizer -> token shards on disk, in blocks
tokenized by local processes or Ray Data tasks), the tokenizers, the shards' validated reader
and the per-step batches, and the stdlib corpus.

Entry points: :func:`launcher.data.prepare.prepare_data` (the command) and
:func:`launcher.data.tokens.load_training_data` (what a worker trains on).
"""
