"""``sharded-ams plan``: memory, communication and step time of a run, on paper, before
renting the cluster (issue 22). Pure arithmetic over the project's own pieces: the model
is built on the ``meta`` device (no memory), the ZeRO-1 layout comes from
``sharded_ams.layout``, FLOPs from ``launcher.train.step``. ``tests/test_plan.py`` checks
the bytes against real ``ShardedAMS`` and FSDP2 runs on CPU.

* ``model.py``: the model to plan (a named size or a config file), built on ``meta``;
* ``hardware.py``: the GPU table (memory, bf16 peak, NVLink / network / HBM bandwidth,
  with sources) and collective times;
* ``memory.py``: bytes per GPU by item for ZeRO-1 and FSDP, activations;
* ``timing.py``: bytes sent per step, overlap, step time, tokens/s;
* ``report.py``: candidates, ranking, text and JSON; ``command.py``: the argparse front;
* ``machinery.py``: ``--layout-report``, the project's layout, manifest and reshard plan
  at N = 1,024.
"""
