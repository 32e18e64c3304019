"""What runs on each training worker: the loop Ray Train calls, the step helpers (precision,
micro-batches, evaluation, throughput) and the models (GPT, Llama, your factory's).

Entry point: :func:`launcher.train.loop.train_loop` (imports Ray); the pieces in
:mod:`launcher.train.step` and :mod:`launcher.train.models` do not.
"""
