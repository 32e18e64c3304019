"""The ``sharded-ams ckpt`` commands: inspect, consolidate and export checkpoints (no Ray).

Entry point: :func:`launcher.commands.ckpt.add_ckpt_subparser` (registered by
:mod:`launcher.cli`); ``ckpt export`` lives in :mod:`launcher.commands.export`.
"""
